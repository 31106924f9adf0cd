"""Data loading: packing, seeded low-data subsets, separate validation/test splits, and bad files."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from finetune_ext.data.splits import load_splits, make_batch
from finetune_ext.errors import UserError
from finetune_ext.parts import Dist
from finetune_ext.testing import tolerance
from finetune_ext.train.metrics import evaluate
from finetune_ext.train.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer):
    return load_tokenizer(gpt2_tokenizer)


def test_gpt2_tokenizer_loads_offline(gpt2_tokenizer_full) -> None:
    tokenizer = load_tokenizer(gpt2_tokenizer_full)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # the values of OpenAI's encoder
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"


def test_lm_blocks_pack_all_tokens(wikitext_slice, tokenizer) -> None:
    splits = load_splits(
        str(wikitext_slice), tokenizer, block_size=32, max_length=0, train_samples=None, val_size=0, seed=0
    )
    lines = [ln for ln in (wikitext_slice / "valid.txt").read_text().splitlines(keepends=True) if ln.strip()]
    ids = [t for ln in lines for t in tokenizer(ln)["input_ids"]]
    n = len(ids) // 32
    assert splits.task == "lm"
    assert torch.equal(splits.val["input_ids"], torch.tensor(ids[: n * 32]).view(n, 32))


@pytest.mark.parametrize(("model", "side"), [("config:bert-tiny", "right"), ("config:gpt2-tiny", "right"),
                                            ("config:gpt2-tiny", "left")])  # fmt: skip
def test_labelled_batches_end_at_their_longest_example(sst2_slice, gpt2_tokenizer, bert_tokenizer, model, side) -> None:
    """Stored padded to max_length, a batch of right-padded examples ends at its longest one; left padding stays
    (GPT-2 would see its tokens at other positions). The model's outputs are those of the padded batch."""
    tok = load_tokenizer(bert_tokenizer if "bert" in model else gpt2_tokenizer)
    tok.padding_side = side
    splits = load_splits(str(sst2_slice), tok, block_size=8, max_length=64, train_samples=None, val_size=8, seed=0)
    idx = torch.tensor([3, 0, 7, 5])
    padded = {k: v[idx] for k, v in splits.train.items()}
    longest = int(padded["attention_mask"].sum(1).max())
    assert longest < 64
    batch = make_batch(splits.train, idx, splits.task, torch.device("cpu"))
    kept = slice(0, longest) if side == "right" else slice(None)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(batch[key], padded[key][:, kept])
    assert torch.equal(batch["labels"], padded["labels"])
    net = load_model(model, splits.task, tok, splits.num_labels).eval()
    torch.testing.assert_close(net(**batch).logits, net(**padded).logits, **tolerance(torch.float32))


def test_low_data_subsets_are_seeded(wikitext_slice, sst2_slice, tokenizer) -> None:
    kw = dict(block_size=32, max_length=24, val_size=50)
    full = load_splits(str(wikitext_slice), tokenizer, train_samples=None, seed=0, **kw).train["input_ids"]
    a = load_splits(str(wikitext_slice), tokenizer, train_samples=20, seed=0, **kw).train["input_ids"]
    b = load_splits(str(wikitext_slice), tokenizer, train_samples=20, seed=0, **kw).train["input_ids"]
    c = load_splits(str(wikitext_slice), tokenizer, train_samples=20, seed=1, **kw).train["input_ids"]
    assert len(a) == 20 and torch.equal(a, b) and not torch.equal(a, c)
    assert {tuple(r) for r in a.tolist()} <= {tuple(r) for r in full.tolist()}
    frac = load_splits(str(wikitext_slice), tokenizer, train_samples=0.5, seed=0, **kw).train["input_ids"]
    assert len(frac) == round(0.5 * len(full))

    cls = load_splits(str(sst2_slice), tokenizer, train_samples=100, seed=0, **kw)
    cls_all = load_splits(str(sst2_slice), tokenizer, train_samples=None, seed=0, **kw)
    assert cls.num_labels == 2 and len(cls.train["labels"]) == 100 and len(cls.val["labels"]) == 50
    assert len(cls_all.train["labels"]) == 600 - 50 and len(cls.test["labels"]) == 120
    assert torch.equal(cls.val["input_ids"], cls_all.val["input_ids"])  # selection split independent of subset
    val_rows = {tuple(r) for r in cls.val["input_ids"].tolist()}
    train_rows = {tuple(r) for r in cls_all.train["input_ids"].tolist()}
    dup_in_source = len(train_rows & val_rows)
    assert dup_in_source <= 2  # SST-2 repeats a few phrases; the held-out rows themselves are disjoint
    with pytest.raises(UserError, match="train_samples: asked for 5000 examples, the training set has 550"):
        load_splits(str(sst2_slice), tokenizer, train_samples=5000, seed=0, **kw)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text\tlabel\nfine\t1\n", r"train.tsv:1: cannot tell the text and label columns from the header"),
        ("sentence\tlabel\nfine\t1\nbroken row\n", r"train.tsv:3 has 1 fields, expected 2"),
        ("sentence\tlabel\nfine\t1\nfine\t2\n", r"integer labels must be 0..K-1, got \[1, 2\]"),
        ("sentence\tlabel\n", "has no rows"),
    ],
)
def test_malformed_tsv(tmp_path, tokenizer, content, message) -> None:
    (tmp_path / "train.tsv").write_text(content)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t0\n")
    with pytest.raises(UserError, match=message):
        load_splits(str(tmp_path), tokenizer, block_size=8, max_length=8, train_samples=None, val_size=1, seed=0)


def test_missing_split_file(tmp_path, tokenizer) -> None:
    (tmp_path / "train.txt").write_text("some text\n")
    with pytest.raises(UserError, match=r"missing .*valid.txt"):
        load_splits(str(tmp_path), tokenizer, block_size=8, max_length=8, train_samples=None, val_size=0, seed=0)


def test_vocabulary_mismatch_is_refused(tmp_path, tokenizer) -> None:
    small = load_model("config:gpt2-tiny", "lm", tokenizer)
    small.resize_token_embeddings(1000)
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(UserError, match=f"{len(tokenizer)} tokens do not fit the model's vocabulary of 1000"):
        load_model(str(tmp_path / "small"), "lm", tokenizer)


def test_perplexity_is_exp_of_mean_token_nll(wikitext_slice, tokenizer) -> None:
    splits = load_splits(
        str(wikitext_slice), tokenizer, block_size=16, max_length=0, train_samples=None, val_size=0, seed=0
    )
    model = load_model("config:gpt2-tiny", "lm", tokenizer).eval()
    got = evaluate(model, splits.val, "lm", batch_size=7, max_batches=None, device=torch.device("cpu"), ddp=Dist(),
                   autocast=nullcontext)  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=splits.val["input_ids"]).logits.double()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), splits.val["input_ids"][:, 1:].reshape(-1))
    assert got["loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
