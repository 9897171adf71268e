"""``nerve probe``: NerVE metrics of every FFN of a pretrained checkpoint on a fixed set of inputs.

Two layers, usable apart:

* :func:`probe_model` measures any model object on batches you give it (a notebook user's entry point);
  the model's train/eval mode is restored afterwards.
* :func:`run_probe` does what the command does: load MODEL, build the batches, measure, and
  :func:`write_probe` puts ``report.json``, ``report.csv``, ``eigenvalues.npz`` and the PNG plots in a folder.

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

import datetime as _datetime
import math
import platform
import sys
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from nerve_hf.data import EMBEDDED_CORPORA, TEXT_COLUMNS
from nerve_hf.errors import InputError, first_line
from nerve_hf.options import (
    Validated,
    boolean,
    int_list,
    mapping,
    one_of,
    option,
    optional,
    positive_int,
    text,
    token_cap,
)
from nerve_hf.probe.inputs import check_inputs, make_batches
from nerve_hf.probe.models import DTYPES, check_device, classify, default_device, load_model
from nerve_hf.tracking.measurements.cross_layer import CROSS_LAYER_CHOICES
from nerve_hf.tracking.measurements.positions import position_bucket_list

if TYPE_CHECKING:
    from nerve_hf.report import SpectralReport

__all__ = [
    "ProbeConfig",
    "ProbeResult",
    "TokenLoss",
    "probe_model",
    "run_probe",
    "write_probe",
    "format_table",
    "choose_layers",
    "load_checkpoint",
    "measure_checkpoint",
]


def text_list(name: str, value) -> list[str]:
    """A non-empty list of non-empty strings; one string stands for a list of one (``revision="main"``)."""
    from nerve_hf.options import OptionTypeError, OptionValueError

    requirement = "a non-empty list of non-empty strings such as ['step1000', 'step2000']"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise OptionTypeError(name, requirement, value)
    if not value or not all(item.strip() for item in value):
        raise OptionValueError(name, requirement, value)
    return [item.strip() for item in value]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Argument groups of ``nerve probe --help`` (the ``group`` of a field's metadata).
TEXT_INPUT, IMAGE_INPUT, MEASUREMENT = "text input", "image input", "measurement"


@dataclass
class ProbeConfig(Validated):
    """Everything ``nerve probe`` needs. The command's flags are made from these fields (``--<field-with-
    dashes>``; help, ``group`` and ``metavar`` from the metadata) and every error names the flag."""

    option_name = staticmethod(_flag)

    model: str = option(
        MISSING,
        "local model folder (transformers save_pretrained or timm), a Hugging Face Hub id, timm/<name> "
        "for a timm Hub model, or a timm checkpoint file/folder with --timm-arch",
        text,
        metavar="MODEL",
    )
    # ----------------------------------------------------------------------------- text input
    text_file: Optional[str] = option(
        None, "measure on this UTF-8 text file (one document)", optional(text), group=TEXT_INPUT, metavar="FILE"
    )
    dataset: Optional[str] = option(
        None,
        f"embedded corpus ({', '.join(EMBEDDED_CORPORA)}), a local dataset folder, or a Hub dataset id (streamed)",
        optional(text),
        group=TEXT_INPUT,
        metavar="NAME",
    )
    dataset_config: Optional[str] = option(
        None, "configuration of --dataset (e.g. en for allenai/c4)", optional(text), group=TEXT_INPUT, metavar="NAME"
    )
    dataset_split: str = option("train", "split of --dataset", text, group=TEXT_INPUT, metavar="SPLIT")
    text_column: Optional[str] = option(
        None,
        f"column of --dataset holding the text (default: the column a known Hub dataset uses, else the first "
        f"of {', '.join(TEXT_COLUMNS)}, else the first string column)",
        optional(text),
        group=TEXT_INPUT,
        metavar="COLUMN",
    )
    tokenizer: Optional[str] = option(
        None,
        "tokenizer folder or Hub id (default: the model's own)",
        optional(text),
        group=TEXT_INPUT,
        metavar="NAME_OR_PATH",
    )
    seq_len: int = option(
        256,
        "tokens per sequence, special tokens included; capped at the model's maximum",
        positive_int,
        group=TEXT_INPUT,
    )
    # ---------------------------------------------------------------------------- image input
    image_dir: Optional[str] = option(
        None,
        "folder of images, searched recursively, sorted by name (default: the embedded digits)",
        optional(text),
        group=IMAGE_INPUT,
        metavar="DIR",
    )
    num_images: int = option(64, "number of images to measure", positive_int, group=IMAGE_INPUT)
    timm_arch: Optional[str] = option(
        None,
        "timm architecture of a local checkpoint without config.json: a registry name (mixer_b16_224) or a "
        "class path (timm.models.mlp_mixer.MlpMixer) for custom sizes given by --timm-kwargs",
        optional(text),
        group=IMAGE_INPUT,
        metavar="NAME",
    )
    timm_kwargs: Optional[dict] = option(
        None,
        "extra timm.create_model arguments as a JSON object, e.g. '{\"num_blocks\": 4}'",
        optional(mapping),
        group=IMAGE_INPUT,
        metavar="JSON",
    )
    # ---------------------------------------------------------------------------- measurement
    max_tokens: int = option(
        16384,
        "per FFN, measure at most this many tokens (rows); the input is cut to it",
        token_cap,
        group=MEASUREMENT,
    )
    batch_size: int = option(8, "sequences or images per forward pass", positive_int, group=MEASUREMENT)
    layers: Optional[list[int]] = option(
        None,
        "block indices to measure, negative from the end (default: all)",
        optional(int_list),
        group=MEASUREMENT,
        metavar="I,J,...",
    )
    spectra_layers: Optional[list[int]] = option(
        None,
        "layers whose eigenvalue spectra are plotted (default: first, middle, last)",
        optional(int_list),
        group=MEASUREMENT,
        metavar="I,J,...",
    )
    device: Optional[str] = option(
        None, "torch device (default: cuda when present, else cpu)", optional(text), group=MEASUREMENT
    )
    dtype: str = option(
        "float32",
        f"weights and activations dtype, one of {', '.join(DTYPES)}; auto keeps the checkpoint's",
        one_of(DTYPES),
        group=MEASUREMENT,
    )
    revision: Optional[list[str]] = option(
        None,
        "Hub revision (branch, tag or commit) of a transformers model; several, comma-separated "
        "(step1000,step2000: Pythia's convention), probe them as a checkpoint series",
        optional(text_list),
        group=MEASUREMENT,
        metavar="REV[,REV...]",
    )
    trust_remote_code: bool = option(
        False, "allow transformers to run modelling code shipped with the checkpoint", boolean, group=MEASUREMENT
    )
    progress: bool = option(True, "show a progress bar on stderr", boolean, group=MEASUREMENT)
    flow: bool = option(
        False,
        "also the spectra of each FFN's d-wide input and output: SE/PR/EEE at input -> pre -> post -> output, "
        "JS between consecutive stages (flow.png; 2 more d x d states per FFN)",
        boolean,
        group=MEASUREMENT,
    )
    position_buckets: Optional[list[int]] = option(
        None,
        "token-position bucket edges such as 0,16,64: metrics per bucket [e_i, e_i+1) of positions, the last "
        "open (positions.csv, positions.png; one more pre/post state pair per bucket)",
        optional(position_bucket_list),
        group=MEASUREMENT,
        metavar="E0,E1,...",
    )
    spectra: str = option(
        "exact",
        "exact: full float64 eigendecompositions; estimate: FFNs at least 4096 wide get SE, EEE and JS from "
        "stochastic Lanczos quadrature and their top 64 eigenvalues, PR exact (error: docs/metrics.md)",
        one_of(("exact", "estimate")),
        group=MEASUREMENT,
        metavar="exact|estimate",
    )
    cross_layer: Optional[str] = option(
        None,
        "cross-layer coherence: JS between layers' spectra and linear CKA between their FFN inputs, for "
        "adjacent layers or all pairs (cross_layer.csv, cka_matrix.csv, cross_layer.png; d x d per pair)",
        optional(one_of(CROSS_LAYER_CHOICES)),
        group=MEASUREMENT,
        metavar="adjacent|all",
    )

    def __post_init__(self) -> None:
        if self.text_file is not None and self.dataset is not None:
            raise InputError("give --text-file or --dataset, not both")


@dataclass
class ProbeResult:
    """One probe: the metrics, the spectra and where everything came from."""

    report: SpectralReport
    model: dict = field(default_factory=dict)  # provenance of the model
    data: dict = field(default_factory=dict)  # provenance of the inputs
    settings: dict = field(default_factory=dict)  # the options that shaped the measurement
    loss: Optional[float] = None  # mean token loss on the same tokens (``eval_loss``), else None

    def to_json(self) -> dict:
        """The content of ``report.json``."""
        from nerve_hf.metrics import METRIC_NAMES

        content = {
            "rows": self.report.rows,
            "mean": self.report.mean(),
            "model": self.model,
            "data": self.data,
            "settings": self.settings,
            "environment": _environment(),
            "created": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
            "metrics": {
                "definition": "NerVE (Jha & Reagen, ICLR 2026): eigenvalues of the covariance of FFN "
                "pre-activations (up/gate projection output) and post-activations (down "
                "projection input); SE natural-log entropy, PR participation ratio, EEE early "
                "eigenvalue enrichment, JS Jensen-Shannon divergence of pre vs post spectra",
                "names": list(METRIC_NAMES),
            },
        }
        if self.report.positions:
            content["positions"] = self.report.positions
        if self.report.cross_layer:
            content["cross_layer"] = self.report.cross_layer
        if self.loss is not None:
            content["loss"] = self.loss
        return content


def _environment() -> dict:
    import torch

    from nerve_hf import __version__

    versions = {"nerve_hf": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "timm"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", None)
    return versions


def _move(batch, device, dtype):
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
    layers=None,
    max_tokens: int | None = None,
    device=None,
    progress: bool = False,
    total: int | None = None,
    on_output=None,
    flow: bool = False,
    position_buckets=None,
    cross_layer: str | None = None,
    spectra: str = "exact",
) -> SpectralReport:
    """NerVE metrics of ``model``'s FFNs on ``batches``.

    Args:
        model: a model the adapters understand (transformers, timm Mixer, FFN-shaped blocks).
        batches: dicts of keyword inputs (``input_ids``, ``attention_mask`` [B, T]; pads are not counted)
            or tensors passed positionally (images ``[B, C, H, W]``). Moved to ``device`` (default: the
            model's) and, if floating, to the model's dtype.
        adapter, layers, max_tokens: as for :class:`nerve_hf.FFNTracker`.
        progress: show a tqdm bar (``total``: number of batches, if ``batches`` has no ``len``).
        on_output: called with ``(batch, output)`` after each forward pass (the batch as moved), e.g.
            :class:`TokenLoss`.
        flow, position_buckets, cross_layer: the tracker's options beyond the paper
            (:mod:`nerve_hf.coherence`).
        spectra: ``"exact"`` or ``"estimate"``, as for :meth:`nerve_hf.FFNTracker.compute`.

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
    )
    was_training = model.training
    model.eval()
    try:
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=total, desc="nerve probe", unit="batch", file=sys.stderr)
        with torch.no_grad(), tracker:
            for batch in batches:
                batch = _move(batch, device, dtype)
                output = model(**batch) if isinstance(batch, dict) else model(batch)
                if on_output is not None:
                    on_output(batch, output)
        return tracker.compute(spectra=spectra)
    finally:
        model.train(was_training)


def choose_layers(rows: list[dict], wanted: Optional[list[int]] = None) -> list[str]:
    """Sites whose spectra are plotted: those of layers ``wanted`` (negative from the end), else the
    first, middle and last measured layer."""
    layers = sorted({row["layer"] for row in rows})
    if not layers:
        return []
    if wanted is None:
        picked = {layers[0], layers[len(layers) // 2], layers[-1]}
    else:
        count = max(layers) + 1
        picked = {w + count if w < 0 else w for w in wanted}
        missing = sorted(picked - set(layers))
        if missing:
            raise InputError(f"--spectra-layers {missing} were not measured; measured layers: {layers}")
    return [row["site"] for row in rows if row["layer"] in picked]


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
            flow=getattr(config, "flow", False),
            position_buckets=getattr(config, "position_buckets", None),
            cross_layer=getattr(config, "cross_layer", None),
            spectra=getattr(config, "spectra", "exact"),
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


# ------------------------------------------------------------------------------------------- output
def format_table(report: SpectralReport) -> str:
    """The per-layer metrics as an aligned text table, with the layer mean as its last row."""
    from nerve_hf.metrics import METRIC_NAMES

    columns = ["site", "tokens"] + list(METRIC_NAMES)
    body = [[row["site"], str(row["tokens"])] + [_fmt(row[name]) for name in METRIC_NAMES] for row in report.rows]
    mean = report.mean()
    body.append(["mean", ""] + [_fmt(mean[name]) for name in METRIC_NAMES])
    tables = [_aligned(columns, body)]
    if report.rows and "se_input" in report.rows[0]:
        flow_columns = ["site"] + [f"{m}_{s}" for m in ("se", "pr", "eee") for s in ("input", "pre", "post", "output")]
        flow_columns += ["js_input_pre", "js", "js_post_output"]
        flow_body = [[row["site"]] + [_fmt(row[name]) for name in flow_columns[1:]] for row in report.rows]
        tables.append(
            "variance flow (input -> pre -> post -> output; js = pre -> post):\n" + _aligned(flow_columns, flow_body)
        )
    if report.positions:
        position_columns = ["site", "bucket", "tokens"] + list(METRIC_NAMES)
        position_body = [
            [row["site"], row["bucket"], str(row["tokens"])] + [_fmt(row[name]) for name in METRIC_NAMES]
            for row in report.positions
        ]
        tables.append("per position bucket [start-end):\n" + _aligned(position_columns, position_body))
    if report.cross_layer:
        cross_columns = ["site_a", "site_b", "tokens", "cka", "js_pre", "js_post"]
        cross_body = [
            [row["site_a"], row["site_b"], str(row["tokens"])] + [_fmt(row[k]) for k in cross_columns[3:]]
            for row in report.cross_layer
        ]
        tables.append(
            "cross-layer coherence (CKA of FFN inputs, JS of spectra):\n" + _aligned(cross_columns, cross_body)
        )
    return "\n\n".join(tables)


def _aligned(columns: list[str], body: list[list[str]]) -> str:
    """An aligned text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(column), *(len(line[i]) for line in body)) for i, column in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def write_probe(
    result: ProbeResult, out_dir, spectra_layers: Optional[list[int]] = None, with_plots: bool = True
) -> list[Path]:
    """Write ``report.json``, ``report.csv``, ``eigenvalues.npz`` and (``with_plots``) the PNG plots into ``out_dir``;
    with the tracker's options beyond the paper also ``flow_eigenvalues.npz`` and ``flow.png`` (flow),
    ``positions.csv``, ``position_eigenvalues.npz`` and ``positions.png`` (position buckets),
    ``cross_layer.csv``, ``cka_matrix.csv`` and ``cross_layer.png`` (cross-layer coherence).

    Every file is written atomically; files already in ``out_dir`` that this does not produce are kept.
    Returns the paths written.
    """
    import numpy as np

    from nerve_hf.analysis import probe_plots as plots
    from nerve_hf.sinks.archive import spectra_npz
    from nerve_hf.sinks.files import write_bytes, write_csv, write_figure, write_json

    out_dir = Path(out_dir)
    rows = result.report.rows
    sites = choose_layers(rows, spectra_layers)  # before writing anything: may raise InputError
    title = f"{result.model.get('name', '')}"
    report = result.report
    written = [
        write_json(out_dir / "report.json", result.to_json()),
        write_csv(out_dir / "report.csv", report.to_pandas()),  # ROW_KEYS, then flow/extra columns if any
    ]
    if report.eigenvalues:
        eigenvalues = spectra_npz(report.eigenvalues, dtype=np.float64)  # the archive's keys
        written.append(write_bytes(out_dir / "eigenvalues.npz", eigenvalues))
    if report.flow_eigenvalues:
        flow = spectra_npz({}, np.float64, flow=report.flow_eigenvalues)  # "<site>/input", "<site>/output"
        written.append(write_bytes(out_dir / "flow_eigenvalues.npz", flow))
    if report.positions:
        written.append(write_csv(out_dir / "positions.csv", report.positions_to_pandas()))
    if report.position_eigenvalues:  # "<site>/pos/<bucket>/pre", ".../post"
        buckets = spectra_npz({}, np.float64, positions=report.position_eigenvalues)
        written.append(write_bytes(out_dir / "position_eigenvalues.npz", buckets))
    if report.cross_layer:
        from nerve_hf.analysis.layers import layer_matrix

        written.append(write_csv(out_dir / "cross_layer.csv", report.cross_layer_to_pandas()))
        from nerve_hf.sites import family

        families = list(dict.fromkeys(family(row["site"]) for row in rows))
        for name in families:  # cka_matrix.csv; several site families (MLP-Mixer): cka_matrix_<family>.csv
            matrix = layer_matrix(rows, report.cross_layer, "cka", family=name).reset_index()
            file = "cka_matrix.csv" if len(families) == 1 else f"cka_matrix_{name}.csv"
            written.append(write_csv(out_dir / file, matrix))
    if not with_plots:
        return written
    if report.rows and "se_input" in report.rows[0]:
        written.append(write_figure(out_dir / "flow.png", plots.plot_flow(rows, f"variance flow: {title}")))
    if report.positions:
        figure = plots.plot_position_buckets(report.positions, f"metrics per position bucket: {title}")
        written.append(write_figure(out_dir / "positions.png", figure))
    if report.cross_layer:
        figure = plots.plot_cross_layer(rows, report.cross_layer, f"cross-layer coherence: {title}")
        written.append(write_figure(out_dir / "cross_layer.png", figure))
    written.append(write_figure(out_dir / "metrics_per_layer.png", plots.plot_layer_metrics(rows, title)))
    written.append(write_figure(out_dir / "js_per_layer.png", plots.plot_js(rows, f"JS(pre, post) per layer: {title}")))
    if sites and result.report.eigenvalues:
        figure = plots.plot_spectra(result.report.eigenvalues, sites, f"eigenvalue spectra: {title}")
        written.append(write_figure(out_dir / "spectra.png", figure))
    return written
