"""Measuring: :func:`probe_model` (any model, your batches) and :func:`run_probe` (what ``nerve probe`` does:
load MODEL, build its inputs, measure), with the steps a checkpoint series shares (:func:`load_checkpoint`,
:func:`measure_checkpoint`, :func:`probe_settings`).

>>> import torch
>>> from torch import nn
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4)
...     def forward(self, x):
...         return x + self.fc2(self.act(self.fc1(x)))
>>> model = nn.Sequential(Block(), Block()).train()
>>> report = probe_model(model, [torch.randn(2, 5, 4)])
>>> [row["tokens"] for row in report.rows], model.training
([10, 10], True)
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Iterable, Sequence

from nerve_hf.errors import InputError, first_line
from nerve_hf.measurement_options import MEASUREMENT_DEFAULTS
from nerve_hf.probe.config import ProbeConfig
from nerve_hf.probe.inputs import check_inputs, make_batches
from nerve_hf.probe.layers import choose_layers
from nerve_hf.probe.models import check_device, classify, default_device, load_model
from nerve_hf.probe.placement import Placement, input_device, is_dispatched
from nerve_hf.probe.result import ProbeResult

if TYPE_CHECKING:
    from nerve_hf.report import SpectralReport

__all__ = [
    "probe_model",
    "move_batch",
    "TokenLoss",
    "load_checkpoint",
    "measure_checkpoint",
    "probe_settings",
    "run_probe",
]


def move_batch(batch, device, dtype):
    """A batch (tensor or dict of tensors) on ``device``; floating tensors cast to the model's ``dtype``."""
    import torch

    def move(x):
        if not torch.is_tensor(x):
            return x
        return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

    return {k: move(v) for k, v in batch.items()} if isinstance(batch, dict) else move(batch)


def probe_model(
    model,
    batches: Iterable,
    *,
    adapter=None,
    layers: Sequence[int] | None = MEASUREMENT_DEFAULTS["layers"],
    max_tokens: int | None = MEASUREMENT_DEFAULTS["max_tokens"],
    device=None,
    progress: bool = False,
    total: int | None = None,
    on_output=None,
    flow: bool = MEASUREMENT_DEFAULTS["flow"],
    position_buckets: Sequence[int] | None = MEASUREMENT_DEFAULTS["position_buckets"],
    cross_layer: str | None = MEASUREMENT_DEFAULTS["cross_layer"],
    spectra: str = MEASUREMENT_DEFAULTS["spectra"],
    state_device=None,
    on_plan=None,
    experts: Sequence[int] | None = MEASUREMENT_DEFAULTS["experts"],
    experts_per_step: int | None = MEASUREMENT_DEFAULTS["experts_per_step"],
) -> SpectralReport:
    """NerVE metrics of ``model``'s FFNs on ``batches``.

    Args:
        model: a model the adapters understand (transformers, timm Mixer, FFN-shaped blocks).
        batches: dicts of keyword inputs (``input_ids``, ``attention_mask`` [B, T]; pads are not counted)
            or tensors passed positionally (images ``[B, C, H, W]``). Moved to ``device`` (default: the
            device of the model's first module; under a device map, its first entry's execution device)
            and, if floating, to the model's dtype. The model itself is never moved.
        adapter: as for :class:`nerve_hf.FFNTracker`.
        layers, max_tokens, flow, position_buckets, cross_layer, spectra, experts, experts_per_step: what is
            measured, defaults and meaning as in :class:`~nerve_hf.measurement_options.MeasurementOptions`.
        progress: show a tqdm bar (``total``: number of batches, if ``batches`` has no ``len``).
        state_device: where the float64 state lives (``"cpu"``: host memory); None: each FFN's own device.
        on_plan: called with the :class:`~nerve_hf.probe.memory_plan.MemoryPlan` before the first batch
            (the plan is checked either way: :class:`~nerve_hf.probe.memory_plan.MemoryPlanError` when the
            state and eigendecomposition do not fit in a device's free memory).
        on_output: called with ``(batch, output)`` after each forward pass (the batch as moved), e.g.
            :class:`TokenLoss`.

    The model runs in eval mode under ``torch.no_grad``; its train/eval mode is restored afterwards.
    """
    import torch

    from nerve_hf.probe.memory_plan import plan_memory
    from nerve_hf.tracking.tracker import FFNTracker

    parameter = next(model.parameters(), None)
    device = torch.device(device) if device is not None else input_device(model)
    dtype = parameter.dtype if parameter is not None else None
    tracker = FFNTracker(
        model,
        adapter=adapter,
        layers=layers,
        max_tokens=max_tokens,
        flow=flow,
        position_buckets=position_buckets,
        cross_layer=cross_layer,
        state_device=state_device,
        experts=experts,
        experts_per_step=experts_per_step,
    )
    plan = plan_memory(model, tracker, spectra)
    if on_plan is not None:
        on_plan(plan)
    plan.check()
    was_training = model.training
    model.eval()
    try:
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=total, desc="nerve probe", unit="batch", file=sys.stderr)
        with torch.no_grad(), tracker:
            for batch in batches:
                batch = move_batch(batch, device, dtype)
                output = model(**batch) if isinstance(batch, dict) else model(batch)
                if on_output is not None:
                    on_output(batch, output)
        return tracker.compute(spectra=spectra)
    finally:
        model.train(was_training)


def load_checkpoint(config: ProbeConfig, spec: str | None = None, revision: str | None = None):
    """``(loaded, adapter, sites)`` of checkpoint ``spec`` (default ``config.model``) at ``revision``, with
    ``config``'s loading options; InputError for anything the user can fix. Bad ``--layers`` /
    ``--spectra-layers`` fail here, before any data is read or forward run."""
    import model_adapters

    spec = config.model if spec is None else spec
    source = classify(spec, config.timm_arch)
    # quantized weights (while loading, or saved so) load on the probe's device: nothing moves them after
    device = check_device(config.device or default_device()) if config.device_map is None else None
    placement = Placement(config.device_map, config.max_memory, config.offload_folder, config.quantization, device)
    loaded = load_model(
        source,
        tokenizer=config.tokenizer,
        timm_arch=config.timm_arch,
        timm_kwargs=config.timm_kwargs,
        dtype=config.dtype,
        revision=revision,
        trust_remote_code=config.trust_remote_code,
        placement=placement,
    )
    try:
        adapter = model_adapters.get_adapter(loaded.model)
    except ValueError as error:
        raise InputError(
            f"unsupported architecture: {first_line(error)} Register one with model_adapters.register_adapter."
        ) from None
    try:
        sites = model_adapters.resolve_sites(model_adapters.unwrap_model(loaded.model), adapter, config.layers)
    except (ValueError, IndexError) as error:
        raise InputError(f"cannot measure {spec!r}: {first_line(error)}") from None
    choose_layers([{"site": site.site, "layer": site.layer} for site in sites], config.spectra_layers)
    if loaded.provenance.get("quantization") is not None:  # what the FFN projections are, as loaded
        loaded.provenance["quantization"]["ffn_modules"] = projection_classes(sites)
    return loaded, adapter, sites


def projection_classes(sites) -> list[str]:
    """The classes of the watched FFNs' projection modules and of their weights, e.g.
    ``Linear(weight=Int8Tensor)``: what a quantized checkpoint's FFNs are as loaded."""
    found = {}
    for site in sites:
        for module in (site.pre, site.post):
            weight = getattr(module, "weight", None)
            found[f"{type(module).__name__}(weight={type(weight).__name__})"] = None
    return list(found)


class TokenLoss:
    """Mean next-token cross-entropy of a causal LM over the real tokens of its batches: called with each
    ``(batch, output)`` of :func:`probe_model` (``on_output``); labels are the batch's ``input_ids`` and a
    position counts when the token it predicts is real (``attention_mask`` 1), so pads never count."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def __call__(self, batch, output) -> None:
        import torch.nn.functional as F

        logits = output.logits[:, :-1].double()  # [B, T-1, V]: position t predicts token t+1
        labels = batch["input_ids"][:, 1:]  # [B, T-1]
        mask = batch.get("attention_mask")
        keep = mask[:, 1:].bool() if mask is not None else labels.new_ones(labels.shape, dtype=bool)
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")  # [B*(T-1)]
        self.total += float(losses[keep.flatten()].sum())
        self.count += int(keep.sum())

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


def measure_checkpoint(
    config: ProbeConfig, spec: str, loaded, adapter, batches, device: str, *, eval_loss: bool = False, progress=None
):
    """``(report, loss)``: ``loaded`` measured on ``batches`` (its mean token loss when ``eval_loss``,
    else None). The model is moved to ``device``, unless it was placed by a device map or quantized
    (then inputs go to its first module's device). The memory plan is printed on stderr before the work
    (with the progress bar) and kept in ``loaded.memory_plan``."""
    if eval_loss and loaded.provenance.get("auto_class") != "AutoModelForCausalLM":
        raise InputError(f"--eval-loss needs a causal language model; {spec!r} is a {loaded.provenance.get('class')}")
    loss = TokenLoss() if eval_loss else None
    dispatched = is_dispatched(loaded.model)
    model = loaded.model if dispatched else loaded.model.to(device)

    def show_plan(plan) -> None:
        loaded.memory_plan = plan.to_dict()
        if config.progress if progress is None else progress:  # --no-progress: stderr stays quiet
            print(plan.format(), file=sys.stderr)

    try:
        report = probe_model(
            model,
            batches,
            adapter=adapter,
            layers=config.layers,
            max_tokens=config.max_tokens,
            progress=config.progress if progress is None else progress,
            total=len(batches),
            on_output=loss,
            flow=config.flow,
            position_buckets=config.position_buckets,
            cross_layer=config.cross_layer,
            spectra=config.spectra,
            device=None if dispatched else device,
            state_device=config.state_device,
            on_plan=show_plan,
            experts=config.experts,
            experts_per_step=config.experts_per_step,
        )
    except (ValueError, IndexError) as error:  # layers out of range, widths the adapter cannot read, no memory
        raise InputError(f"cannot measure {spec!r}: {first_line(error)}") from None
    except (RuntimeError, AssertionError, TypeError) as error:  # the model rejected its input
        raise InputError(f"the forward pass of {spec!r} failed ({type(error).__name__}): {first_line(error)}") from None
    return report, (loss.mean if loss is not None else None)


def probe_settings(config: ProbeConfig, device: str, seq_len: int, model, data: dict | None = None) -> dict:
    """The options that shaped a measurement, as ``report.json`` records them (one revision as a string).
    ``dataset_split`` is the split the tokens were read from (``data["split"]`` of :func:`make_batches`:
    ``validation`` for the embedded corpus, ``validation+train`` when it needed both), None when no dataset
    was read (a text file, images)."""
    settings = {key: value for key, value in asdict(config).items() if key not in ("progress",)}
    settings["dataset_split"] = (data or {}).get("split")
    revision = settings.get("revision")
    if isinstance(revision, list) and len(revision) == 1:
        settings["revision"] = revision[0]
    parameter = next(model.parameters(), None)
    settings.update(
        device=str(input_device(model)) if is_dispatched(model) else str(device),
        seq_len_used=seq_len,
        dtype_used=str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
    )
    return settings


def run_probe(config: ProbeConfig, *, eval_loss: bool = False) -> ProbeResult:
    """Load ``config.model``, build its inputs, measure; InputError for anything the user can fix.
    ``eval_loss``: also the mean token loss of a causal LM on the same tokens (``ProbeResult.loss``).
    Several revisions are a checkpoint series: :func:`nerve_hf.probe.series.run_series`."""
    if config.revision is not None and len(config.revision) > 1:
        raise InputError("several --revision values are a checkpoint series: use nerve_hf.probe.series.run_series")
    revision = config.revision[0] if config.revision else None
    source = classify(config.model, config.timm_arch)
    file_text = check_inputs(config, source.modality)  # the text of --text-file, read once
    device = check_device(config.device or default_device())
    loaded, adapter, _ = load_checkpoint(config, config.model, revision)
    seq_len = min(config.seq_len, loaded.max_length) if loaded.max_length else config.seq_len
    batches, data = make_batches(config, loaded, seq_len, file_text)
    report, loss = measure_checkpoint(config, config.model, loaded, adapter, batches, device, eval_loss=eval_loss)
    settings = probe_settings(config, device, seq_len, loaded.model, data)
    settings["memory_plan"] = loaded.memory_plan
    return ProbeResult(report=report, model=loaded.provenance, data=data, settings=settings, loss=loss)
