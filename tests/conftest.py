"""Shared fixtures: devices (tests marked ``cuda`` skip, with the reason, where no GPU or no CUDA kernels exist)
and small real-data slices of WikiText-2 and SST-2 from the shared data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast

import finetune_ext


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if not finetune_ext.has_cuda_kernels():
        return f"CUDA kernels not built ({finetune_ext.build_info()['cuda_build_reason']})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _cuda_skip_reason()
    if reason is None:
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _subprocess_env(tmp_path_factory):
    """What CLI subprocesses inherit: one token cache for the session (not the user's), and faulthandler, so a
    process that aborts prints every thread's Python stack (a two-rank run once died of SIGABRT saying nothing else)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_EXT_CACHE", str(tmp_path_factory.mktemp("token-cache")))
        mp.setenv("PYTHONFAULTHANDLER", "1")
        yield


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]


def shared_data(*parts: str):
    """A path under the shared data folder (``$FINETUNE_EXT_DATA`` or ``../shared/data``); skips if absent."""
    from finetune_ext.data import shared_data_dir

    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set FINETUNE_EXT_DATA to the folder of WikiText-2/SST-2)")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_full() -> str:
    """The shared GPT-2 tokenizer: 50,257 tokens."""
    return str(shared_data("gpt2-tokenizer"))


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_full, tmp_path_factory) -> str:
    """GPT-2's byte-level BPE cut to its first 768 merges, plus ``<|endoftext|>``: 1,025 tokens. Same rules, and a
    tiny GPT-2's embedding and output layer 49 times smaller, which otherwise dominate its time (one LiFT CLI run
    of the tests took 28 s with the full vocabulary, 10 s with this one)."""
    spec = json.loads((Path(gpt2_tokenizer_full) / "tokenizer.json").read_text())
    model = spec["model"]
    model["merges"] = model["merges"][:768]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < 256 + len(model["merges"])}
    (end,) = spec["added_tokens"]
    end["id"] = model["vocab"][end["content"]] = len(model["vocab"])
    folder = tmp_path_factory.mktemp("gpt2-tok")
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return str(folder)


@pytest.fixture(scope="session")
def wikitext_slice(tmp_path_factory) -> Path:
    """The first lines of WikiText-2's train/valid/test files."""
    src = shared_data("wikitext-2")
    out = tmp_path_factory.mktemp("wikitext")
    for split, lines in (("train", 300), ("valid", 60), ("test", 60)):
        text = (src / f"{split}.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        (out / f"{split}.txt").write_text("".join(text[:lines]), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def sst2_slice(tmp_path_factory) -> Path:
    """The first 600 training sentences and 120 dev sentences of SST-2."""
    src = shared_data("SST-2")
    out = tmp_path_factory.mktemp("sst2")
    for split, rows in (("train", 600), ("dev", 120)):
        lines = (src / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        (out / f"{split}.tsv").write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def gpt2_no_dropout(tmp_path_factory) -> str:
    """A 2-layer GPT-2 configuration without dropout (runs on different process counts then agree)."""
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    config = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
    config |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    path.write_text(json.dumps(config))
    return f"config:{path}"


@pytest.fixture(scope="session")
def bert_tokenizer(tmp_path_factory, sst2_slice) -> str:
    """A WordPiece tokenizer over the SST-2 slice's words (the shared data has no BERT vocabulary)."""
    words = sorted(
        {w for line in (sst2_slice / "train.tsv").read_text().splitlines()[1:] for w in line.split("\t")[0].split()}
    )
    folder = tmp_path_factory.mktemp("bert-tok")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)  # transformers 5: vocab, not vocab_file
    return str(folder)
