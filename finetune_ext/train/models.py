"""Models and tokenizers: a hub id, a local folder, or a small configuration built in code."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from finetune_ext.errors import UserError
from finetune_ext.nn import keys
from finetune_ext.optim.blocks import layer_index

# Small configurations for tests and offline experiments: `--model config:<name>`.
_DECODER_TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                     intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
TINY_CONFIGS = {
    "gpt2-tiny": lambda: GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=256),
    "gpt2-small": lambda: GPT2Config(),
    "bert-tiny": lambda: BertConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128, max_position_embeddings=256
    ),
    # The Llama layout (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention: 4 heads, 2 key/value heads).
    "llama-tiny": lambda: LlamaConfig(**_DECODER_TINY),
    "mistral-tiny": lambda: MistralConfig(**_DECODER_TINY, sliding_window=128),
    "qwen2-tiny": lambda: Qwen2Config(**_DECODER_TINY),  # q/k/v projections with biases
    # TinyLlama-1.1B's shape (22 layers, 2048 wide, 32 heads, 4 key/value heads): the GPU script's ~1B model.
    "llama-1b": lambda: LlamaConfig(
        num_hidden_layers=22,
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
}


def check_model_spec(spec: str, what: str = "model") -> None:
    """Fail early, naming the option ``what``, when ``spec`` is meant as a local path that does not exist."""
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if not spec.startswith("config:") and looks_like_path and not Path(spec).expanduser().exists():
        raise UserError(f"{what}: no such folder {spec!r}")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A tokenizer from the hub or a local folder (e.g. the GPT-2 BPE files), with a pad token set."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"tokenizer: cannot load {name_or_path!r} ({_first_line(err)})") from None
    vocab = tok.get_vocab()
    if tok.eos_token is None and "<|endoftext|>" in vocab:  # bare GPT-2 BPE files carry no special-token map
        tok.eos_token = tok.bos_token = "<|endoftext|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(spec: str, task: str, tokenizer: PreTrainedTokenizerBase, num_labels: int = 2) -> PreTrainedModel:
    """``spec``: ``config:<tiny name>``, ``config:<config.json>``, a local folder or a hub id.

    ``task`` is ``"lm"`` (causal LM head), ``"classification"`` or ``"regression"`` (sequence classification
    head with ``num_labels`` outputs). Models built from a
    configuration take their vocabulary size from the tokenizer.
    """
    if task not in ("lm", "classification", "regression"):
        raise ValueError(f"task: expected 'lm', 'classification' or 'regression', got {task!r}")
    auto = AutoModelForCausalLM if task == "lm" else AutoModelForSequenceClassification
    extra = {} if task == "lm" else {"num_labels": num_labels}
    if spec.startswith("config:"):
        name = spec.removeprefix("config:")
        if name in TINY_CONFIGS:
            config = TINY_CONFIGS[name]()
        elif Path(name).is_file():
            config = AutoConfig.from_pretrained(name)
        else:
            raise UserError(f"model: unknown config {name!r}; expected one of {sorted(TINY_CONFIGS)} or a config.json")
        config.vocab_size = len(tokenizer)
        for key, value in extra.items():
            setattr(config, key, value)
        config.pad_token_id = tokenizer.pad_token_id
        model = auto.from_config(config)
    else:
        check_model_spec(spec)
        try:
            model = auto.from_pretrained(spec, **extra)
        except (OSError, ValueError) as err:
            raise UserError(f"model: cannot load {spec!r} ({_first_line(err)})") from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"tokenizer: {len(tokenizer)} tokens do not fit the model's vocabulary of {model.config.vocab_size}"
        )
    return model


# The frozen weights' storage dtype per --dtype (nf4: what quantize_4bit leaves is bf16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "nf4": torch.bfloat16}


def cast_frozen(model: torch.nn.Module, dtype: str) -> None:
    """Store the parameters that do not train in ``dtype`` (``fp32`` / ``bf16`` / ``fp16``; ``nf4``: bf16 for those
    that ``quantize_4bit`` left); those that train, and packed 4-bit weights, stay as they are. A ``UserError`` when
    nothing is frozen and ``dtype`` is not fp32."""
    if dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if dtype != "fp32" and not frozen:
        raise UserError(f"dtype: {dtype} stores the frozen base weights, and this run trains every weight (add an "
                        "adapter, or train some layers: LiFT's blocks, adamw's layers)")  # fmt: skip
    for p in frozen:
        if p.is_floating_point():
            p.data = p.data.to(DTYPES[dtype])


def quantize_4bit(model: torch.nn.Module) -> None:
    """QLoRA's base, in place: every ``nn.Linear`` of the transformer layers becomes a bitsandbytes ``Linear4bit``
    (NF4, double quantization, bf16 compute), quantized on the device its weight is on. Embeddings, norms and
    heads are left to ``cast_frozen`` (bf16). GPT-2's ``Conv1D`` layers are not ``nn.Linear``: a ``UserError``
    when no layer qualifies."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("dtype: nf4 needs bitsandbytes (pip install 'finetune_ext[qlora]')") from None
    targets = [(parent, child_name, child) for name, parent in model.named_modules()
               for child_name, child in parent.named_children()
               if type(child) is torch.nn.Linear and layer_index(f"{name}.{child_name}") is not None]  # fmt: skip
    if not targets:
        raise UserError(f"dtype: nf4 found no nn.Linear in the transformer layers of {type(model).__name__} (GPT-2's "
                        "Conv1D layers are not quantized); use --dtype bf16")  # fmt: skip
    for parent, child_name, child in targets:
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")  # fmt: skip
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place for no-grad evaluation and back when a
        # state dict is taken, and the round trip changes the next training steps in their last bits: resume would
        # not be exact. The one packing for every call keeps it so.
        layer.support_avx512bf16_for_cpu = False
        setattr(parent, child_name, layer.to(child.weight.device).train(child.training))


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Hugging Face activation checkpointing of every layer, non-reentrant, its recomputed forwards under the key
    of the forward they repeat (``keys.checkpoint_context``): the same dropout masks and weight noise."""
    kwargs = {"use_reentrant": False, "context_fn": keys.checkpoint_context}
    if not model.supports_gradient_checkpointing:
        raise UserError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard(model: PreTrainedModel) -> None:
    """FSDP2 in place: each transformer layer (the classes of ``_no_split_modules``) one unit, then the rest. Every
    parameter becomes this process's DTensor shard; a forward gathers each unit's weights while it runs."""
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)


def max_positions(model: PreTrainedModel) -> int | None:
    """The model's context length, where its configuration states one."""
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def param_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
