"""Diagonal empirical Fisher of the pre-training objective, from per-sample gradients.

``F_j = (1/N) Σ_i (∂l_i/∂θ_j)²`` over N samples, ``l_i`` the causal-LM loss (decoders) or masked-LM loss
(encoders) of sample i alone, as in the official Guided-Dropout code (batch size 1). Per-sample gradients
come from ``torch.func`` (``vmap`` over ``grad``) in chunks; models ``vmap`` cannot batch fall back to a loop.
Sums are all-reduced under DDP. Results can be cached as safetensors (``FisherCache``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from finetune_ext import safefiles
from finetune_ext.curvature.models import eager_attention
from finetune_ext.errors import RunWarning
from finetune_ext.parts import Dist


def mask_tokens(
    input_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
    special: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (DataCollatorForLanguageModeling's rule): 15% of tokens are targets, never the ``special``
    ones ([CLS], [SEP]: a bool mask); of those 80% become ``mask_id``, 10% a random token, 10% stay. Returns
    (inputs, labels with -100 on non-targets)."""
    labels = input_ids.clone()
    target = torch.rand(input_ids.shape, generator=generator) < probability
    if special is not None:
        target &= ~special
    labels[~target] = -100
    inputs = input_ids.clone()
    replace = target & (torch.rand(input_ids.shape, generator=generator) < 0.8)
    inputs[replace] = mask_id
    randomize = target & ~replace & (torch.rand(input_ids.shape, generator=generator) < 0.5)
    inputs[randomize] = torch.randint(vocab_size, input_ids.shape, generator=generator)[randomize]
    return inputs, labels


def _sample_loss(model: nn.Module, names: tuple[str, ...], causal: bool):
    def loss(params: tuple[torch.Tensor, ...], input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = functional_call(
            model, dict(zip(names, params, strict=True)), args=(), kwargs={"input_ids": input_ids[None]}
        ).logits[0]
        if causal:
            logits, labels = logits[:-1], labels[1:]
        # Mean over the targets, 0 (not 0/0) for a sample without one; such samples are skipped before this.
        total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum().clamp_min(1)

    return loss


def empirical_fisher(
    model: nn.Module,
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    causal: bool,
    chunk_size: int = 8,
    progress: bool = True,
    use_vmap: bool = True,
    dist: Dist | None = None,
) -> dict[str, torch.Tensor]:
    """Mean squared per-sample gradient for every trainable parameter (float32, on the model's device).

    ``samples`` yields ``(input_ids [L], labels [L])``, the tokens of one example (no padding: the model sees
    no attention mask), L may vary; labels are -100 where no loss is taken (for causal LMs pass the input ids:
    the shift happens here). Samples of one length are batched ``chunk_size`` at a time. The model runs in eval
    mode (no dropout). Under ``dist`` with several processes each passes its share of the samples and the sums
    are added over the processes, so every process returns the same estimate.
    """
    from tqdm.auto import tqdm

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = tuple(n for n, _ in named)
    params = tuple(p.detach() for _, p in named)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    loss = _sample_loss(model, names, causal)
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0), randomness="same")
    was_training = model.training
    model.eval()
    count = 0
    waiting: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)  # by length: vmap stacks them

    def flush(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        nonlocal use_vmap
        ids = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        if use_vmap:
            try:
                grads = per_sample(params, ids, labels)
                for s, g in zip(sums, grads, strict=True):
                    s += g.float().pow(2).sum(0)
                return
            except RuntimeError:  # data-dependent control flow in the model: one sample at a time
                use_vmap = False
        for i in range(len(ids)):
            g_i = grad(loss)(params, ids[i], labels[i])
            for s, g in zip(sums, g_i, strict=True):
                s += g.float().pow(2)

    try:
        with eager_attention(model):  # SDPA has no vmap batching rule on CPU; eager batches
            for ids, labels in tqdm(samples, desc="fisher", disable=not progress, unit="sample"):
                if not bool(((labels[1:] if causal else labels) != -100).any()):
                    continue  # no token to predict (MLM masked none, or one token for a causal LM): no information
                batch = waiting[len(ids)]
                batch.append((ids, labels))
                count += 1
                if len(batch) == chunk_size:
                    flush(batch)
                    batch.clear()
            for batch in waiting.values():
                if batch:
                    flush(batch)
    finally:
        model.train(was_training)
    total = torch.tensor([float(count)], device=sums[0].device)  # a rank may hold no sample: fine
    for s in [*sums, total] if dist is not None else ():
        dist.sum_(s)
    if total.item() == 0:
        raise ValueError("samples: expected at least one sample with a token to predict, got none")
    fisher = {n: s / total for n, s in zip(names, sums, strict=True)}
    bad = next((n for n, f in fisher.items() if not torch.isfinite(f).all()), None)
    if bad is not None:
        raise FloatingPointError(f"fisher: the estimate of {bad} is not finite (a sample's loss overflowed)")
    return fisher


class FisherCache:
    """Fisher tensors as ``<dir>/<key>.safetensors``, keyed by the model's identity and the sample settings."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    @staticmethod
    def key(model: nn.Module, **settings: object) -> str:
        """Hash of parameter names, shapes, a fingerprint of their values, and the settings."""
        h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            probe = flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes()
            h.update(f"{name}:{tuple(p.shape)}".encode() + probe)
        return h.hexdigest()[:24]

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The cached estimate, or ``None`` (absent; or damaged: reported with its path and removed)."""
        path = self.directory / f"{key}.safetensors"
        if not path.exists():
            return None
        fisher, problem = safefiles.load(path)
        bad = problem or next((f"holds a non-finite score in {k}" for k, v in (fisher or {}).items()
                               if not torch.isfinite(v).all()), "")  # fmt: skip
        if bad:
            warnings.warn(f"fisher_cache: {path} {bad}; removed it, estimating again", RunWarning, stacklevel=2)
            path.unlink(missing_ok=True)
            return None
        return fisher

    def save(self, key: str, fisher: dict[str, torch.Tensor]) -> Path | None:
        """Write the estimate with its digest; a folder that cannot be written warns and returns ``None`` (the
        cache is optional: the run goes on with the estimate it has)."""
        path = self.directory / f"{key}.safetensors"
        try:
            safefiles.save(fisher, path)
        except OSError as err:
            warnings.warn(f"fisher_cache: cannot write {path} ({err.strerror or err}); going on without caching",
                          RunWarning, stacklevel=2)  # fmt: skip
            return None
        return path
