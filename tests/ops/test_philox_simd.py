"""The CPU kernels' Philox words on every vector path (AVX-512, AVX2, scalar): each path, chosen with
FINETUNE_EXT_SIMD in a fresh process, gives the references' bits for fisher_dropout and gaussian_perturb, on
sizes whose last block is not a whole number of vectors; and the key every random op passes them."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

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


def test_an_unknown_simd_level_warns_names_it_and_is_ignored() -> None:
    """A cap the kernels would reject at their first call is dropped at import with one warning (it used to fail
    every op with a traceback); the kernels then take the widest path the CPU has."""
    code = (
        "import torch; from finetune_ext import ops\n"
        "print(ops.fisher_dropout(torch.ones(4, 4), torch.full((4,), 0.5), backend='ext').shape)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "FINETUNE_EXT_SIMD": "avx3"}, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "torch.Size([4, 4])" in proc.stdout, proc.stderr[-2000:]
    assert proc.stderr.count("FINETUNE_EXT_SIMD: expected avx512, avx2, scalar, got 'avx3'; ignored") == 1


def test_philox_key_draws_from_the_generator_and_survives_its_buffer() -> None:
    import gc

    from finetune_ext.ops._library import philox_key

    g = torch.Generator().manual_seed(11)
    expected = torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(11))
    key = philox_key(None, 7, g)
    gc.collect()  # the array behind a frombuffer tensor lives as long as the tensor
    assert key.dtype == torch.int64 and key.tolist() == [int(expected), 7]
    assert philox_key(2**63 - 1, 0, None).tolist() == [2**63 - 1, 0]
    compiled = torch.compile(lambda: philox_key(None, 3, None), fullgraph=True)  # traced: tensor ops
    torch.manual_seed(5)
    drawn = compiled()
    torch.manual_seed(5)
    assert drawn.tolist() == philox_key(None, 3, None).tolist()
