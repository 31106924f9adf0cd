"""``PartsTrainer`` over a model that transformers sharded with FSDP2 as it loaded it: two gloo processes give the
DDP run's losses and trained weights (adapters with guided dropout, and a full fine-tune), and a part that cannot
shard, or tensor parallelism, is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from finetune_ext.testing import tolerance
from finetune_ext.train.models import load_model, load_tokenizer


def test_a_model_sharded_as_it_loads_trains_as_under_ddp(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    torch.manual_seed(0)
    load_model("config:llama-tiny", "lm", load_tokenizer(gpt2_tokenizer)).save_pretrained(tmp_path / "llama")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(Path(__file__).with_name("fsdp_driver.py"))]  # fmt: skip
    for mode in ("ddp", "fsdp"):
        args = [str(tmp_path / mode), str(tmp_path / "llama"), str(wikitext_slice), gpt2_tokenizer, mode]
        done = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-6000:]
    ddp, fsdp = (json.loads((tmp_path / mode / "results.json").read_text()) for mode in ("ddp", "fsdp"))
    for run in ("adapter", "full"):
        assert len(ddp["losses"][run]) == 4
        torch.testing.assert_close(torch.tensor(fsdp["losses"][run]), torch.tensor(ddp["losses"][run]),
                                   **tolerance(torch.float32))  # fmt: skip
        a, b = (load_file(str(tmp_path / mode / f"{run}.safetensors")) for mode in ("ddp", "fsdp"))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], **tolerance(torch.float32), msg=f"{run}: {key}")
    armijo, tp = fsdp["refused"]["armijo"], fsdp["refused"]["tp"]
    assert armijo.startswith("optimizer: armijo does not run on FSDP shards (") and "\n" not in armijo
    assert tp.startswith("distributed_config: PartsTrainer runs on FSDP shards only (fsdp_size), got tp_size=2;")
