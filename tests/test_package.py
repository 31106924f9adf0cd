"""Import, build information and the reference fallback when the compiled library is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import finetune_ext

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_reports_the_build() -> None:
    info = finetune_ext.build_info()
    assert info["extension_loaded"], info["load_error"]
    assert info["libstdcxx"] == "dynamic"  # a static copy crashes on C++ error messages (the H200 image's compiler)
    assert info["runtime_torch"] == torch.__version__
    assert info["built_against_torch"] == torch.__version__
    assert info["cuda_kernels"] == finetune_ext.has_cuda_kernels()
    if info["cuda_kernels"]:
        assert info["cuda_archs"]
    public = {"fisher_dropout", "softmax_ce_hessian_vp", "linchain_compose", "lora_linear", "gaussian_perturb"}
    assert public | {"armijo_moments_", "armijo_update_"} <= set(info["kernels"]["cpu"])


def test_linked_libraries_tell_a_static_libstdcxx_apart(tmp_path) -> None:
    """build_info's libstdc++ check reads the library's DT_NEEDED entries: a copy linked in statically (as the H200
    image's compiler did, which crashed every error message of ours) leaves libstdc++ out of them."""
    from finetune_ext._loader import linked_libraries

    gxx = shutil.which("g++") or pytest.skip("no g++ on this machine")
    src = tmp_path / "x.cpp"
    src.write_text("#include <sstream>\n#include <string>\nstd::string f(long i) { std::ostringstream s; s << i; "
                   "return s.str(); }\n")  # fmt: skip
    for flags, dynamic in (([], True), (["-static-libstdc++"], False)):
        lib = tmp_path / f"x{len(flags)}.so"
        subprocess.run([gxx, "-shared", "-fPIC", *flags, str(src), "-o", str(lib)], check=True)
        assert any(name.startswith("libstdc++.so") for name in linked_libraries(lib)) is dynamic
    assert linked_libraries(src) == []


def test_info_check_runs_every_op_against_its_reference(capsys) -> None:
    from finetune_ext.cli import main
    from finetune_ext.selfcheck import CHECKS

    assert main(["info", "--check"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu ")]
    assert len(lines) == len(CHECKS) and all(line.endswith(" ok") for line in lines)


def test_import_without_compiled_library_falls_back_to_reference() -> None:
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["finetune_ext._C"] = None  # makes `import finetune_ext._C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import finetune_ext
        import torch
        from finetune_ext import ops, reference
        assert any("compiled kernels not loaded" in str(w.message) for w in caught), caught
        assert not finetune_ext.has_cuda_kernels()
        assert not finetune_ext.build_info()["extension_loaded"]
        x = torch.randn(4, 6)
        y = ops.fisher_dropout(x, 0.5, seed=3)
        assert torch.equal(y, reference.fisher_dropout(x, torch.tensor(0.5), seed=3))
        try:
            ops.fisher_dropout(x, 0.5, backend="ext")
        except RuntimeError as err:
            assert "no compiled fisher_dropout kernel for cpu" in str(err)
        else:
            raise AssertionError("backend='ext' should fail without the library")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_leaves_torch_dynamo_unloaded() -> None:
    """``import finetune_ext`` costs torch's import and little more: not torch._dynamo's 1.8 s."""
    script = "import sys, finetune_ext; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_constant_for_compile_marks_as_torch_compiler_does() -> None:
    """Our marker is what ``torch.compiler.assume_constant_result`` sets (so torch.compile folds the checks)."""
    from finetune_ext._devices import constant_for_compile

    def theirs() -> int:
        return 1

    def ours() -> int:
        return 1

    torch.compiler.assume_constant_result(theirs)
    constant_for_compile(ours)
    assert vars(ours) == vars(theirs) != {}


def test_architecture_coverage() -> None:
    """Cubins run on the same major version at an equal or higher minor; PTX on anything at least as new."""
    from finetune_ext._devices import parse_archs, runs_on

    archs = "7.5;8.0;9.0;10.0;12.0+PTX"
    assert parse_archs(archs) == ([(7, 5), (8, 0), (9, 0), (10, 0), (12, 0)], [(12, 0)])
    assert parse_archs("8.0 9.0a") == ([(8, 0), (9, 0)], [])
    covered = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1), (13, 0)]
    assert all(runs_on(c, archs) for c in covered)
    assert not any(runs_on(c, archs) for c in [(7, 0), (6, 1), (11, 0)])
    assert not runs_on((8, 9), "9.0") and not runs_on((7, 5), "8.0+PTX") and runs_on((8, 9), "8.0+PTX")


def test_a_gpu_without_a_kernel_image_falls_back_to_the_reference(monkeypatch) -> None:
    """Simulated: a device of compute capability 7.0 (V100) against a build without it, then one with it."""
    from finetune_ext import _devices
    from finetune_ext.ops._library import use_kernel

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla V100")
    monkeypatch.setattr(_devices, "built_archs", lambda: "7.5;8.0;9.0;10.0;12.0+PTX")
    monkeypatch.setattr("finetune_ext.ops._library.has_kernel", lambda op, device: True)
    _devices._cuda_supported.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"Tesla V100 \(sm_70\) is not covered .* run the pure-PyTorch"):
            assert not use_kernel("fisher_dropout", "auto", torch.device("cuda:0"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # decided once per device: no second warning
            assert not use_kernel("softmax_ce_hessian_vp", "auto", torch.device("cuda:0"))
        with pytest.raises(RuntimeError, match=r"backend='ext': the compiled CUDA kernels have no image for cuda:0"):
            use_kernel("fisher_dropout", "ext", torch.device("cuda:0"))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
        assert use_kernel("fisher_dropout", "auto", torch.device("cuda:1"))  # an L4 beside it: sm_80 cubins
    finally:
        _devices._cuda_supported.cache_clear()


# Headers and names of C++20 that C++17 lacks. Our sources compile as the C++ standard the running torch builds
# extensions with: C++20 here, C++17 with torch 2.11 on the H200 (its run 4 failed to build on std::endian).
CXX20_ONLY = re.compile(
    r"#include <(bit|span|concepts|ranges|format|numbers|compare|source_location|version)>"
    r"|std::(endian|bit_cast|span|popcount|countl_zero|countr_zero|has_single_bit|ssize|midpoint|lerp|format)\b"
    r"|\b(consteval|constinit|co_await|co_yield|co_return|char8_t)\b|<=>|\.(starts_with|ends_with|contains)\("
)


def test_csrc_uses_no_cxx20_only_features() -> None:
    sources = sorted((ROOT / "csrc").rglob("*.[ch]*"))
    assert len(sources) >= 20
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if CXX20_ONLY.search(line)
    ]
    assert not found, "\n".join(found)
