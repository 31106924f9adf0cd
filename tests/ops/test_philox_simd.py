"""The CPU kernels' Philox words on every vector path (AVX-512, AVX2, scalar): each path, chosen with
FINETUNE_EXT_SIMD in a fresh process, gives the references' bits for fisher_dropout and gaussian_perturb, on
sizes whose last block is not a whole number of vectors."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = """
import torch
from finetune_ext import ops, reference
for n, d in ((1, 1), (5, 37), (257, 129), (1024, 64)):
    x = torch.randn(n, d)
    keep = torch.rand(d) * 0.9 + 0.1
    got = ops.fisher_dropout(x, keep, seed=123456789012, offset=987654321, backend="ext")
    want = reference.fisher_dropout(x, keep, seed=123456789012, offset=987654321)
    assert torch.equal(got, want), ("fisher_dropout", n, d)
    std = torch.rand(n)
    got = ops.gaussian_perturb(x, std, seed=2**61 + 5, offset=2**35 + 7, backend="ext")
    assert torch.equal(got, reference.gaussian_perturb(x, std, seed=2**61 + 5, offset=2**35 + 7)), ("perturb", n, d)
print("ok")
"""


def test_every_vector_path_gives_the_reference_bits() -> None:
    runs = {
        level: subprocess.Popen(
            [sys.executable, "-c", CHECK],
            env={**os.environ, "FINETUNE_EXT_SIMD": level, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for level in ("avx512", "avx2", "scalar")
    }
    for level, proc in runs.items():
        out, err = proc.communicate()
        assert proc.returncode == 0 and out.strip() == "ok", f"{level}: {err[-2000:]}"


def test_an_unknown_simd_level_is_an_error_that_names_it() -> None:
    code = (
        "import torch; from finetune_ext import ops\n"
        "ops.fisher_dropout(torch.ones(4, 4), torch.full((4,), 0.5), backend='ext')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "FINETUNE_EXT_SIMD": "avx3"}, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "FINETUNE_EXT_SIMD: expected avx512, avx2 or scalar, got 'avx3'" in proc.stderr
