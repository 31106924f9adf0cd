"""Import, build information and the reference fallback when the compiled library is missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

import finetune_ext


def test_build_info_reports_the_build() -> None:
    info = finetune_ext.build_info()
    assert info["extension_loaded"], info["load_error"]
    assert info["runtime_torch"] == torch.__version__
    assert info["built_against_torch"] == torch.__version__
    assert info["cuda_kernels"] == finetune_ext.has_cuda_kernels()
    if info["cuda_kernels"]:
        assert info["cuda_archs"]


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
