"""GPT-2 variants of the NerVE paper as transformations of ``transformers.GPT2LMHeadModel``.

| paper | variant knob | transformation |
|---|---|---|
| §3.1 activation | ``activation="gelu" / "relu"`` | config ``activation_function`` |
| §3.2 normalisation-free | ``layernorm=False`` | every ``nn.LayerNorm`` (ln_1, ln_2, ln_f) -> ``nn.Identity`` |
| §3.2 learnable LeakyReLU | ``activation="learnable_lrelu"`` | ``mlp.act`` -> ``LearnableLeakyReLU`` |
| §3.3 FFN weight geometry | ``ffn_weight_norm="weight" / "spectral" / "hyperspherical"`` | c_fc, c_proj parametrised |
| §3.4 LayerNorm placement | ``norm_position="pre" / "post" / "mix"`` | leading blocks -> ``PostLNBlock`` |
| §3.4 FFN width | ``width_mult=1, 2, 4, 8`` | config ``n_inner = width_mult * n_embd`` |

Deviation from the paper's code: its custom blocks drop the FFN/attention biases and split the QKV
projection; here the stock HF modules (with biases) are kept so that every variant stays a GPT-2 model
that nerve_hf (adapters, tracker) already knows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from ._modules import replace_modules
from .activations import LearnableLeakyReLU
from .norm_position import apply_norm_position
from .weight_norms import apply_ffn_weight_norm


@dataclass(frozen=True)
class GPT2Shape:
    n_embd: int  # residual width d
    n_layer: int  # number of blocks
    n_head: int  # attention heads (n_embd must be divisible)
    n_positions: int  # rows of the learned position table = longest context
    vocab_size: int  # default vocabulary when the caller passes none
    tie_word_embeddings: bool = True  # LM head shares wte (GPT-2's default)


GPT2_SIZES: dict[str, GPT2Shape] = {
    # tests: odd vocabulary, 2 blocks
    "tiny": GPT2Shape(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=97),
    # 2 CPU cores, a locally trained tokenizer
    "cpu": GPT2Shape(n_embd=128, n_layer=4, n_head=4, n_positions=128, vocab_size=4096),
    # NerVE §3.1-3.4: GPT-2 small, 124.4M parameters ("125M"), trained on CodeParrot at context 128
    "paper": GPT2Shape(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    # optimizer runs on FineWeb (Dion's 160M shape): GPT-2 small with an untied LM head, 163.0M
    "160m": GPT2Shape(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257, tie_word_embeddings=False),
    # optimizer runs on FineWeb: GPT-2 medium, 354.8M
    "350m": GPT2Shape(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257),
}

# activation name -> config activation_function (module swapped in afterwards when MODULE_ACTIVATIONS has it)
CONFIG_ACTIVATIONS: dict[str, str] = {
    "gelu": "gelu",  # exact GELU, the paper's baseline (HF GPT-2 defaults to the tanh "gelu_new")
    "gelu_new": "gelu_new",
    "relu": "relu",
    "learnable_lrelu": "relu",  # placeholder, replaced by MODULE_ACTIVATIONS below
}
MODULE_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "learnable_lrelu": LearnableLeakyReLU,
}


def gpt2_config(
    size: str = "tiny",
    vocab_size: int | None = None,
    activation: str = "gelu",
    width_mult: float = 4,
    **overrides: Any,
) -> GPT2Config:
    """The ``GPT2Config`` of a size preset with the config-level knobs (activation, FFN width) set."""
    if size not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose one of {sorted(GPT2_SIZES)}")
    if activation not in CONFIG_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(CONFIG_ACTIVATIONS)}")
    fields = {**asdict(GPT2_SIZES[size]), **overrides}  # overrides may replace preset fields (n_layer=...)
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    # GPT-2 uses its last token (50256) as <|endoftext|>; keep that convention for any vocabulary
    fields.setdefault("bos_token_id", fields["vocab_size"] - 1)
    fields.setdefault("eos_token_id", fields["vocab_size"] - 1)
    fields.setdefault("n_inner", int(round(width_mult * fields["n_embd"])))  # FFN width D
    return GPT2Config(activation_function=CONFIG_ACTIVATIONS[activation], **fields)


def set_ffn_activation(model: nn.Module, factory: Callable[[], nn.Module]) -> int:
    """Install ``factory()`` as ``mlp.act`` of every GPT-2 block (one module, so one slope, per layer)."""
    blocks = getattr(model, "transformer", model).h
    for block in blocks:
        block.mlp.act = factory()
    return len(blocks)


def remove_layernorms(model: nn.Module) -> list[str]:
    """Replace every ``nn.LayerNorm`` (ln_1, ln_2, ln_f, ln_cross_attn) by ``nn.Identity``; returns their names."""
    return replace_modules(model, lambda name, module: isinstance(module, nn.LayerNorm), lambda module: nn.Identity())


def build_gpt2(
    size: str = "tiny",
    vocab_size: int | None = None,
    activation: str = "gelu",
    layernorm: bool = True,
    ffn_weight_norm: str | None = None,
    norm_position: str = "pre",
    post_fraction: float = 0.25,
    width_mult: float = 4,
    **config_overrides: Any,
) -> GPT2LMHeadModel:
    """Build a randomly initialised GPT-2 variant.

    ``activation``: gelu | relu | gelu_new | learnable_lrelu. ``layernorm=False``: NormFree.
    ``ffn_weight_norm``: None | weight | spectral | hyperspherical. ``norm_position``: pre | post | mix
    (``post_fraction`` of the blocks PostLN for mix). ``width_mult``: FFN width D = width_mult * d.
    Extra keywords go to ``GPT2Config`` (e.g. ``n_positions``, ``resid_pdrop``). The model's ``loss_type`` is
    ``"ForCausalLM"``: under a Trainer, its loss is the mean next-token cross-entropy over the predicted tokens.
    """
    if not layernorm and norm_position != "pre":
        raise ValueError("norm_position needs LayerNorms; a NormFree model (layernorm=False) has none to place")
    config = gpt2_config(size, vocab_size, activation, width_mult, **config_overrides)
    model = GPT2LMHeadModel(config)
    # GPT2LMHeadModel's class name maps to no loss type (loss_type None): it computes ForCausalLMLoss anyway, but
    # the Trainer then counts all B*T labels for the B*(T-1) predicted tokens (num_items_in_batch), and its
    # loss/eval_loss come out (T-1)/T of the mean next-token cross-entropy. Naming the loss makes them that mean.
    model.loss_type = "ForCausalLM"
    if activation in MODULE_ACTIVATIONS:
        set_ffn_activation(model, MODULE_ACTIVATIONS[activation])
    if not layernorm:
        remove_layernorms(model)
    if ffn_weight_norm is not None:
        apply_ffn_weight_norm(model, ffn_weight_norm)
    apply_norm_position(model, norm_position, post_fraction)
    return model
