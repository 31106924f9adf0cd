"""Build finetune_ext._C: CPU kernels always, CUDA kernels whenever torch is a CUDA build and a toolkit exists.

Environment:
  FINETUNE_EXT_CUDA   unset/"auto": build CUDA sources if possible; "0": CPU only; "1": CUDA required.
  TORCH_CUDA_ARCH_LIST  defaults to DEFAULT_ARCHS: cubins for sm_75 (T4), sm_80 (A100; also runs on sm_86 A10/
                      RTX 30 and sm_89 L4/Ada), sm_90 (H100/H200), sm_100 (B200), sm_120 (RTX 50) and PTX
                      for sm_120, which the driver compiles for newer GPUs. sm_75 is the oldest CUDA 13 builds.
  DEBUG=1             -O0 -g builds.
A wheel (make wheel) requires exactly the torch release it was built against (its C++ ABI) and carries a local
version label naming it: finetune_ext-0.1.0+pt2141cu130 is built against torch 2.14.1 with CUDA 13.0 kernels,
+pt2141cpu a CPU-only build.
  FINETUNE_EXT_SKIP_BUILD=1  install the Python package only (the Makefile then builds in place with ninja,
                      incrementally, instead of compiling twice).
We never look at torch.cuda.is_available(): a build machine needs no GPU.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CUDA_FLAG = os.environ.get("FINETUNE_EXT_CUDA", "auto").lower()
if CUDA_FLAG not in {"auto", "0", "1"}:
    raise SystemExit(f"FINETUNE_EXT_CUDA must be 0, 1 or auto, got {CUDA_FLAG!r}")
# torch guesses /usr/local when CUDA_HOME is unset (nvcc is linked into /usr/local/bin) and fails there.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
DEFAULT_ARCHS = "7.5;8.0;9.0;10.0;12.0+PTX"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils import cpp_extension  # noqa: E402


def cuda_decision() -> tuple[bool, str]:
    """Whether to compile the CUDA sources, and why."""
    if CUDA_FLAG == "0":
        return False, "FINETUNE_EXT_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        return True, f"torch CUDA {torch.version.cuda}, toolkit {cpp_extension.CUDA_HOME}"
    if CUDA_FLAG == "1":
        raise SystemExit(f"FINETUNE_EXT_CUDA=1 but CUDA sources cannot be built: {reason}")
    return False, reason


def nvidia_pip_includes() -> list[str]:
    """Header dirs of the pip `nvidia-*` wheels (cuBLAS/cuSPARSE headers that some toolkits lack)."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    dirs = {str(Path(h).parent) for r in roots for h in glob.glob(f"{r}/**/include/cublas_v2.h", recursive=True)}
    dirs |= {str(Path(h).parent) for r in roots for h in glob.glob(f"{r}/**/include/cusparse.h", recursive=True)}
    return sorted(dirs)


def write_build_meta(with_cuda: bool, reason: str) -> None:
    meta = {
        "cuda": with_cuda,
        "reason": reason,
        "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else "",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "",
    }
    (ROOT / "finetune_ext" / "_build_meta.py").write_text(
        f'"""Written by setup.py at build time."""\n\nBUILD_META = {meta!r}\n'
    )


VERSION = "0.1.0"
DEPENDENCIES = [
    "numpy",
    "transformers>=5.0,<6",  # tested: 5.25
    "accelerate>=1.0,<2",  # Trainer's; tested: 1.16
    "datasets",
    "safetensors",
    "highspy",
    "tqdm",
    "matplotlib",
    "scipy",
    "scikit-learn",
]


def building() -> bool:
    return os.environ.get("FINETUNE_EXT_SKIP_BUILD") != "1"


def torch_release() -> str:
    return torch.__version__.split("+")[0]


def local_label(with_cuda: bool) -> str:
    """``pt2141cu130``: the torch release and CUDA version (or ``cpu``) the kernels were built for."""
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu"
    return f"pt{torch_release().replace('.', '')}{cuda}"


def extensions() -> list:
    if not building():
        return []
    with_cuda, reason = cuda_decision()
    print(f"finetune_ext: CUDA kernels {'ON' if with_cuda else 'OFF'} ({reason})")
    write_build_meta(with_cuda, reason)
    debug = os.environ.get("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-math-errno: vectorised sqrt; -fno-trapping-math: vectorised branch-free float selects (the softmax exp);
    # -ffp-contract=off: no FMA, so CPU == CUDA bits. None of them changes a rounded result.
    cxx = [*opt, "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    kwargs = {
        "include_dirs": [str(ROOT / "csrc")],
        "extra_link_args": ["-fopenmp"],
        "extra_compile_args": {"cxx": cxx},
    }
    if not with_cuda:
        return [cpp_extension.CppExtension("finetune_ext._C", sources, **kwargs)]
    kwargs["include_dirs"] += nvidia_pip_includes()
    kwargs["extra_compile_args"]["cxx"].append("-DFINETUNE_EXT_WITH_CUDA")  # device-generic ops register CUDA too
    kwargs["extra_compile_args"]["nvcc"] = [*opt, "-lineinfo"]
    sources += sorted(glob.glob("csrc/*.cu"))
    return [cpp_extension.CUDAExtension("finetune_ext._C", sources, **kwargs)]


WITH_CUDA = building() and cuda_decision()[0]
setup(
    version=f"{VERSION}+{local_label(WITH_CUDA)}" if building() else VERSION,
    install_requires=[f"torch=={torch_release()}" if building() else "torch>=2.4", *DEPENDENCIES],
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
