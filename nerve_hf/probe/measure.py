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
    experts: Sequence[int] | None = MEASUREMENT_DEFAULTS["experts"],
    experts_per_step: int | None = MEASUREMENT_DEFAULTS["experts_per_step"],
) -> SpectralReport:
    """NerVE metrics of ``model``'s FFNs on ``batches``.

    Args:
        model: a model the adapters understand (transformers, timm Mixer, FFN-shaped blocks).
        batches: dicts of keyword inputs (``input_ids``, ``attention_mask`` [B, T]; pads are not counted)
            or tensors passed positionally (images ``[B, C, H, W]``). Moved to ``device`` (default: the
            model's) and, if floating, to the model's dtype.
        adapter: as for :class:`nerve_hf.FFNTracker`.
        layers, max_tokens, flow, position_buckets, cross_layer, spectra, experts, experts_per_step: what is
            measured, defaults and meaning as in :class:`~nerve_hf.measurement_options.MeasurementOptions`.
        progress: show a tqdm bar (``total``: number of batches, if ``batches`` has no ``len``).
        on_output: called with ``(batch, output)`` after each forward pass (the batch as moved), e.g.
            :class:`TokenLoss`.

    The model runs in eval mode under ``torch.no_grad``; its train/eval mode is restored afterwards.
    """
    import torch

    from nerve_hf.tracking.tracker import FFNTracker

    parameter = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (parameter.device if parameter is not None else None)
    dtype = parameter.dtype if parameter is not None else None
    tracker = FFNTracker(
        model,
        adapter=adapter,
        layers=layers,
        max_tokens=max_tokens,
        flow=flow,
        position_buckets=position_buckets,
        cross_layer=cross_layer,
        experts=experts,
        experts_per_step=experts_per_step,
    )
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
    loaded = load_model(
        source,
        tokenizer=config.tokenizer,
        timm_arch=config.timm_arch,
        timm_kwargs=config.timm_kwargs,
        dtype=config.dtype,
        revision=revision,
        trust_remote_code=config.trust_remote_code,
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
    return loaded, adapter, sites


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
    else None). The model is moved to ``device``."""
    if eval_loss and loaded.provenance.get("auto_class") != "AutoModelForCausalLM":
        raise InputError(f"--eval-loss needs a causal language model; {spec!r} is a {loaded.provenance.get('class')}")
    loss = TokenLoss() if eval_loss else None
    model = loaded.model.to(device)
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
            experts=config.experts,
            experts_per_step=config.experts_per_step,
        )
    except (ValueError, IndexError) as error:  # layers out of range, widths the adapter cannot read
        raise InputError(f"cannot measure {spec!r}: {first_line(error)}") from None
    except (RuntimeError, AssertionError, TypeError) as error:  # the model rejected its input
        raise InputError(f"the forward pass of {spec!r} failed ({type(error).__name__}): {first_line(error)}") from None
    return report, (loss.mean if loss is not None else None)


def probe_settings(config: ProbeConfig, device: str, seq_len: int, model) -> dict:
    """The options that shaped a measurement, as ``report.json`` records them (one revision as a string)."""
    settings = {key: value for key, value in asdict(config).items() if key not in ("progress",)}
    revision = settings.get("revision")
    if isinstance(revision, list) and len(revision) == 1:
        settings["revision"] = revision[0]
    parameter = next(model.parameters(), None)
    settings.update(
        device=str(device),
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
    settings = probe_settings(config, device, seq_len, loaded.model)
    return ProbeResult(report=report, model=loaded.provenance, data=data, settings=settings, loss=loss)
