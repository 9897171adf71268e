"""Run settings and the presets (smoke, cpu, cpu-long, gpu-short, paper) of the model-zoo benchmarks.

A run's settings are resolved in this order, later entries winning (every layer is plain data):

1. ``RunSettings`` defaults (below),
2. ``PRESETS[preset][task]`` (``task`` is ``"lm"`` or ``"image"``),
3. the experiment config's ``settings[preset]``,
4. the run's own ``settings`` (every preset) and its ``preset_settings[preset]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from nerve_hf.data import DEFAULT_CORPUS

TASKS = ("lm", "image")
PRESET_NAMES = ("smoke", "cpu", "cpu-long", "gpu-short", "paper")
PACKED_DATA_DIR = "benchmarks/data/gpu-short"  # gpu-short's tokens (benchmarks/pack_corpus.py), relative to the repo


@dataclass(frozen=True)
class RunSettings:
    """Everything one training run needs besides the variant's own transformation."""

    task: str = "lm"  # "lm" (causal LM, perplexity) or "image" (classification, accuracy)
    variant: str = "gpt2-gelu"  # key of nerve_zoo.VARIANTS
    size: str = "tiny"  # zoo size preset of the variant's family (tiny/cpu/paper/160m/71m/...)
    model_overrides: dict = field(default_factory=dict)  # extra build_model kwargs (n_embd=64, n_positions=...)
    optimizer: str = "adamw"  # key of nerve_zoo.optim.OPTIMIZERS
    optimizer_options: dict = field(default_factory=dict)  # build_optimizer options (momentum, matrix_lr, ...)
    learning_rate: float = 1e-3  # peak learning rate (the paper's GPT-2 runs: 1e-3)
    weight_decay: float = 0.1  # decoupled weight decay on >= 2-D tensors (the paper: 0.1)
    scheduler: str = "cosine"  # transformers lr_scheduler_type
    warmup_ratio: float = 0.05  # share of max_steps spent in linear warmup
    max_grad_norm: float = 1.0  # gradient clipping
    dataset: str = DEFAULT_CORPUS  # LM: embedded corpus or Hub id; image: "digits" or "cifar100"
    dataset_config: Optional[str] = None  # Hub subset (None: nerve_hf.data.HUB_TEXT_DATASETS' default)
    streaming: bool = False  # stream a Hub dataset instead of downloading it whole
    data_dir: Optional[str] = None  # image: local cifar-100-python directory (else the Hub)
    tokenizer: Optional[str] = None  # LM: Hub/local tokenizer; None = BPE trained locally on the corpus
    vocab_size: int = 2048  # LM: vocabulary of the locally trained BPE (ignored with a named tokenizer)
    corpus_max_bytes: Optional[int] = 3_000_000  # LM: embedded corpus cap in bytes (None = the whole corpus)
    packed_data: Optional[str] = None  # LM: folder of benchmarks/pack_corpus.py (tokens, tokenizer, fingerprint),
    # relative to the repository unless absolute; replaces dataset/tokenizer/vocab_size/corpus_max_bytes
    max_epochs: Optional[float] = None  # LM: refuse to start a run that would pass over its training blocks
    # more often than this (1.0: no token is seen twice); None = no check
    block_size: int = 64  # LM: tokens per training sequence (context length)
    image_size: int = 16  # image: side the images are resized to
    batch_size: int = 16  # sequences/images per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 300  # optimizer steps (image runs: 0 = use epochs)
    epochs: float = 0.0  # image: passes over the training set when max_steps is 0
    eval_every: int = 25  # optimizer steps between evaluations (each one also measures NerVE spectra)
    eval_dense_every: int = 0  # steps between evaluations in the opening phase (0: eval_every throughout)
    eval_dense_until: float = 0.0  # share of the run's steps that the opening phase covers (0.1: the first 10%)
    eval_samples: int = 128  # LM blocks / images in the evaluation set (0 = the whole split)
    nerve_max_tokens: Optional[int] = None  # tokens per FFN per evaluation spectrum (None = all)
    seed: int = 0  # model init, data order
    bf16: bool = False  # bfloat16 autocast (GPU presets)
    dataloader_workers: int = 0  # DataLoader worker processes

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    def eval_schedule(self, max_steps: int) -> list[int]:
        """Optimizer steps that end in an evaluation: every ``eval_dense_every`` steps up to
        ``eval_dense_until * max_steps``, then every ``eval_every`` steps, and always the last step.

        >>> RunSettings(eval_every=100, eval_dense_every=10, eval_dense_until=0.1).eval_schedule(1000)[:12]
        [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300]
        >>> RunSettings(eval_every=25).eval_schedule(60)
        [25, 50, 60]
        """
        dense_end = int(self.eval_dense_until * max_steps) if self.eval_dense_every > 0 else 0
        steps = set(range(self.eval_dense_every, dense_end + 1, self.eval_dense_every)) if dense_end else set()
        steps |= set(range(self.eval_every, max_steps + 1, self.eval_every))
        steps.add(max_steps)
        return sorted(steps)

    def to_dict(self) -> dict:
        return asdict(self)


_FIELDS = {f.name for f in fields(RunSettings)}

# preset -> task -> RunSettings fields
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # tests: the zoo's tiny shapes, a 512-token BPE on 200 kB of stdlib code, 3 steps, 3 evaluations
    "smoke": {
        "lm": dict(
            size="tiny",
            vocab_size=512,
            corpus_max_bytes=200_000,
            block_size=32,
            batch_size=4,
            max_steps=3,
            eval_every=1,
            eval_samples=8,
            warmup_ratio=0.0,
        ),
        "image": dict(
            task="image",
            size="tiny",
            dataset="digits",
            image_size=16,
            batch_size=16,
            max_steps=3,
            eval_every=1,
            eval_samples=64,
            learning_rate=1e-3,
            weight_decay=0.0,
            warmup_ratio=0.0,
        ),
    },
    # 2 CPU cores: GPT-2/LLaMA with d=64, 4 blocks, context 64 on the stdlib code corpus (~0.8M tokens),
    # 300 steps of 16x64 tokens (~310K tokens), 12 evaluations on 128 held-out blocks; lr 2e-3 with 10%
    # warmup (the paper's 1e-3 leaves these short runs in the early spectral-collapse phase)
    "cpu": {
        "lm": dict(
            size="cpu",
            vocab_size=2048,
            corpus_max_bytes=3_000_000,
            block_size=64,
            batch_size=16,
            max_steps=300,
            eval_every=25,
            eval_samples=128,
            learning_rate=2e-3,
            weight_decay=0.1,
            warmup_ratio=0.1,
        ),
        "image": dict(
            task="image",
            size="tiny",
            dataset="digits",
            image_size=16,
            batch_size=64,
            max_steps=0,
            epochs=12,
            eval_every=24,
            eval_samples=0,
            learning_rate=1e-3,
            weight_decay=0.0,
            warmup_ratio=0.05,
        ),
    },
    # 2 CPU cores for hours (about 6.1 core-hours for all eight experiments, benchmarks/README.md): d = 128,
    # 4 blocks, context 128 on a 40 MB slice of the python-env corpus (stdlib + site-packages, ~10M train
    # tokens) with its own 8192-token BPE; 2,000 steps of 8 x 128 tokens (2.0M tokens: no token seen twice),
    # evaluations every 10 steps over the first 10% of training and every 100 after it (38 in all) on 64
    # held-out blocks; Mixer: C = 128 on digits for 40 epochs
    "cpu-long": {
        "lm": dict(
            size="cpu",
            dataset="python-env",
            vocab_size=8192,
            corpus_max_bytes=40_000_000,
            block_size=128,
            batch_size=8,
            max_steps=2000,
            eval_every=100,
            eval_dense_every=10,
            eval_dense_until=0.1,
            eval_samples=64,
            learning_rate=2e-3,
            weight_decay=0.1,
            warmup_ratio=0.05,
            max_epochs=1.0,
        ),
        "image": dict(
            task="image",
            size="cpu",
            dataset="digits",
            image_size=16,
            batch_size=64,
            max_steps=0,
            epochs=40,
            eval_every=50,
            eval_dense_every=5,
            eval_dense_until=0.1,
            eval_samples=0,
            learning_rate=1e-3,
            weight_decay=0.0,
            warmup_ratio=0.05,
        ),
    },
    # one H100/H200 for <= 10 minutes of wall time, all experiments (benchmarks/run_gpu_short.sh runs them in
    # four parallel processes): d = 384, 6 blocks, context 256, 32 x 256 tokens/step for 1,000 steps (8.2M
    # tokens, no token seen twice) on python-env tokens packed here by benchmarks/pack_corpus.py (<= 48 MB,
    # carried to the GPU machine; its own Python and packages never enter the data), bf16 autocast;
    # evaluations every 10 steps over the first 10% and every 100 after it on 128 blocks. Sizes are an
    # estimate until a GPU run confirms them (benchmarks/README.md)
    "gpu-short": {
        "lm": dict(
            size="cpu",
            packed_data=PACKED_DATA_DIR,
            block_size=256,
            batch_size=32,
            max_steps=1000,
            eval_every=100,
            eval_dense_every=10,
            eval_dense_until=0.1,
            eval_samples=128,
            learning_rate=1e-3,
            weight_decay=0.1,
            warmup_ratio=0.05,
            max_epochs=1.0,
            bf16=True,
            dataloader_workers=2,
        ),
        "image": dict(
            task="image",
            size="cpu",
            dataset="digits",
            image_size=16,
            batch_size=128,
            max_steps=0,
            epochs=60,
            eval_every=50,
            eval_dense_every=5,
            eval_dense_until=0.1,
            eval_samples=0,
            learning_rate=1e-3,
            weight_decay=0.0,
            warmup_ratio=0.05,
            bf16=True,
        ),
    },
    # NerVE's GPU settings (run with accelerate): GPT-2 125M on CodeParrot, context 128, batch 128 with
    # 4 accumulation steps (32 x 4), lr 1e-3, weight decay 0.1, ~41K steps
    "paper": {
        "lm": dict(
            size="paper",
            dataset="codeparrot/codeparrot-clean",
            streaming=True,
            tokenizer="gpt2",
            corpus_max_bytes=None,
            block_size=128,
            batch_size=32,
            grad_accum=4,
            max_steps=41_000,
            eval_every=1000,
            eval_samples=2048,
            learning_rate=1e-3,
            weight_decay=0.1,
            warmup_ratio=0.01,
            nerve_max_tokens=65_536,
            bf16=True,
            dataloader_workers=4,
        ),
        # Mixer-B/16 on CIFAR-100 for 120 epochs at 224 pixels
        "image": dict(
            task="image",
            size="paper",
            dataset="cifar100",
            image_size=224,
            batch_size=128,
            max_steps=0,
            epochs=120,
            eval_every=2000,
            eval_samples=0,
            learning_rate=1e-3,
            weight_decay=0.05,
            warmup_ratio=0.05,
            nerve_max_tokens=65_536,
            bf16=True,
            dataloader_workers=8,
        ),
    },
}


# preset -> model family -> build_model overrides applied before the experiment's own (shapes per family)
PRESET_SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {},
    # cpu: d = 64, 4 blocks, context 64 (GPT-2 D = 4d = 256; LLaMA SwiGLU D = 172); Mixer: 16 tokens, C = 64
    "cpu": {
        "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=64),
        "llama": dict(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        "mixer": dict(embed_dim=64, num_blocks=4),
    },
    # cpu-long: d = 128, 4 blocks, context 128 (GPT-2 D = 512; LLaMA SwiGLU D = 344); Mixer: 64 tokens, C = 128
    "cpu-long": {
        "gpt2": dict(n_embd=128, n_layer=4, n_head=4, n_positions=128),
        "llama": dict(
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=128,
        ),
        "mixer": dict(embed_dim=128, num_blocks=4),
    },
    # gpu-short: d = 384, 6 blocks, context 256 (GPT-2 D = 1536; LLaMA D = 1024); Mixer: 64 tokens, C = 256
    "gpu-short": {
        "gpt2": dict(n_embd=384, n_layer=6, n_head=6, n_positions=256),
        "llama": dict(
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=6,
            max_position_embeddings=256,
        ),
        "mixer": dict(embed_dim=256, num_blocks=6),
    },
    "paper": {},
}
# the MoE LLaMA takes the dense LLaMA's shape: its intermediate_size D is the dense width, each of its experts
# has width D / top_k (nerve_zoo.moe), so both have the same active FFN parameters per token
for _shapes in PRESET_SHAPES.values():
    if "llama" in _shapes:
        _shapes["llama_moe"] = dict(_shapes["llama"])


def run_settings(recorded: dict) -> RunSettings:
    """The RunSettings of a result file's recorded ``settings`` dict (fields added since then take their
    defaults)."""
    return RunSettings(**{k: v for k, v in recorded.items() if k in _FIELDS})


def settings_differences(recorded: RunSettings, wanted: RunSettings) -> dict:
    """``field -> (recorded, wanted)`` for every field where the two differ."""
    a, b = asdict(recorded), asdict(wanted)
    return {key: (a[key], b[key]) for key in a if a[key] != b[key]}


def check_keys(overrides: dict, where: str) -> None:
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown run settings {unknown}; known: {sorted(_FIELDS)}")


def resolve(preset: str, task: str, *layers: dict) -> RunSettings:
    """RunSettings of ``preset``/``task`` with the override ``layers`` applied in order.

    ``model_overrides`` and ``optimizer_options`` merge key by key; every other field is replaced.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    settings = replace(RunSettings(task=task), **PRESETS[preset][task])
    for layer in layers:
        check_keys(layer, f"preset {preset}")
        merged = dict(layer)
        for key in ("model_overrides", "optimizer_options"):
            if key in merged:
                merged[key] = {**getattr(settings, key), **merged[key]}
        settings = replace(settings, **merged)
    from nerve_zoo import VARIANTS  # registry only: imports neither transformers nor timm

    if settings.variant not in VARIANTS:
        raise ValueError(f"unknown variant {settings.variant!r}; choose one of {list(VARIANTS)}")
    shape = PRESET_SHAPES[preset].get(VARIANTS[settings.variant].family, {})
    return replace(settings, model_overrides={**shape, **settings.model_overrides})
