"""One scenario definition, run through every path of :class:`~nerve_hf.FFNTracker` and compared each time
with an independent float64 reference (the idea of torchmetrics' ``MetricTester``).

A :class:`Scenario` names a tiny model with odd sizes (hidden 32, FFN width 37, 2 layers), a padded batch
(right and left padding in the same batch, fed as two forwards) and tracker options (``flow``,
``position_buckets``, ``max_tokens``, ``layers``). :func:`run_tracker` measures it with the library; the
paths differ only in what surrounds that call (the sync-free device path forced onto CPU tensors, 2 gloo
processes, site-sharded processes: ``tests/workers/scenario_worker.py``).

The reference never asks the library where the FFNs are or which tokens are real: :func:`capture` hooks the
FFN modules itself (pre = the up/gate projection's output, post = the down projection's input, input and
output around them) and keeps the rows of real tokens; :func:`expected_report` applies ``max_tokens`` (the
first rows of each process, in the order the forwards saw them) and computes every metric with NumPy/SciPy
(:mod:`reference`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from reference import activation_metrics, spectrum_reference, two_pass
from scipy.spatial.distance import jensenshannon
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from nerve_hf import FFNTracker

VOCAB, HIDDEN, FFN_WIDTH, N_LAYER = 61, 32, 37, 2
LENGTH = 11
# (left, right) padding of each sample: 11, 7, 8 and 5 real tokens; halves of 18 and 13 tokens
PADDING = ((0, 0), (0, 4), (3, 0), (0, 6))
MICRO_BATCHES = 2  # each process feeds its samples as this many forwards
INTEGER_KEYS = ("site", "layer", "dim", "tokens", "dim_input", "bucket", "position_start", "position_end")


@dataclass(frozen=True)
class Scenario:
    """A model family and the tracker options to measure it with."""

    name: str
    family: str  # "gpt2" or "llama"
    flow: bool = False
    position_buckets: tuple[int, ...] | None = None
    max_tokens: int | None = None
    layers: tuple[int, ...] | None = None

    def __str__(self) -> str:
        return self.name

    def tracker_options(self) -> dict:
        buckets = list(self.position_buckets) if self.position_buckets is not None else None
        layers = list(self.layers) if self.layers is not None else None
        return dict(flow=self.flow, position_buckets=buckets, max_tokens=self.max_tokens, layers=layers)

    def tracked_layers(self) -> list[int]:
        return sorted({layer % N_LAYER for layer in self.layers}) if self.layers is not None else list(range(N_LAYER))


SCENARIOS = (
    Scenario("gpt2", "gpt2"),
    Scenario("gpt2-flow-buckets-cap15", "gpt2", flow=True, position_buckets=(0, 2, 5), max_tokens=15),
    Scenario("llama-flow-buckets", "llama", flow=True, position_buckets=(0, 2, 5)),
    Scenario("llama-cap24-last-layer", "llama", max_tokens=24, layers=(-1,)),
)


# ----------------------------------------------------------------------------- model and batch
def build_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's tiny float64 model in eval mode, the same on every process for the same seed."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=16, n_embd=HIDDEN, n_head=4, n_layer=N_LAYER, n_inner=FFN_WIDTH,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN_WIDTH, num_hidden_layers=N_LAYER,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown family {family!r}")
    return model.double().eval()


def ffn_modules(model: torch.nn.Module, family: str) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(up/gate projection, down projection) of every block, found by their names in the model code."""
    if family == "gpt2":
        return [(block.mlp.c_fc, block.mlp.c_proj) for block in model.transformer.h]
    return [(layer.mlp.gate_proj, layer.mlp.down_proj) for layer in model.model.layers]


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[4, LENGTH]`` with the :data:`PADDING` of each sample."""
    ids = torch.randint(1, VOCAB, (len(PADDING), LENGTH), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(len(PADDING), LENGTH, dtype=torch.long)
    for sample, (left, right) in enumerate(PADDING):
        mask[sample, :left] = 0
        mask[sample, LENGTH - right :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut along the sample axis into ``parts`` consecutive pieces (process shares, forwards)."""
    pieces = {key: value.chunk(parts) for key, value in batch.items()}
    return [{key: pieces[key][i] for key in batch} for i in range(parts)]


def run_tracker(model: torch.nn.Module, scenario: Scenario, batch: dict, **options):
    """The library's measurement of ``batch`` (fed as :data:`MICRO_BATCHES` forwards): its report."""
    tracker = FFNTracker(model, **scenario.tracker_options(), **options)
    with tracker, torch.no_grad():
        for forward in split(batch, MICRO_BATCHES):
            model(**forward)
    return tracker.compute()


def report_dict(report) -> dict:
    """The parts of a report the scenarios compare, as JSON-ready lists of rows."""
    return {"rows": report.rows, "positions": report.positions}


# ----------------------------------------------------------------------------- the reference
def capture(model: torch.nn.Module, family: str, batch: dict) -> list[dict[str, np.ndarray]]:
    """Per block, float64 rows ``[N, width]`` of ``input``, ``pre``, ``post``, ``output`` over the real
    tokens of ``batch`` (fed as :data:`MICRO_BATCHES` forwards, rows in the order they ran), and each
    token's ``positions`` ``[N]`` (real tokens before it in its sequence)."""
    stages = [{name: [] for name in ("input", "pre", "post", "output", "positions")} for _ in range(N_LAYER)]
    keep: list[torch.Tensor] = []  # the running forward's real-token mask [B*T]

    def rows(x: torch.Tensor) -> np.ndarray:
        return x.detach().reshape(-1, x.shape[-1])[keep[-1]].double().numpy()

    handles = []
    for layer, (up, down) in enumerate(ffn_modules(model, family)):
        seen = stages[layer]
        handles += [
            up.register_forward_pre_hook(lambda m, args, seen=seen: seen["input"].append(rows(args[0]))),
            up.register_forward_hook(lambda m, args, out, seen=seen: seen["pre"].append(rows(out))),
            down.register_forward_pre_hook(lambda m, args, seen=seen: seen["post"].append(rows(args[0]))),
            down.register_forward_hook(lambda m, args, out, seen=seen: seen["output"].append(rows(out))),
        ]
    try:
        with torch.no_grad():
            for forward in split(batch, MICRO_BATCHES):
                mask = forward["attention_mask"].bool()  # [B, T]
                keep.append(mask.reshape(-1))
                for seen in stages:
                    seen["positions"].append((mask.long().cumsum(-1) - 1).reshape(-1)[keep[-1]].numpy())
                model(**forward)
    finally:
        for handle in handles:
            handle.remove()
    return [{name: np.concatenate(parts) for name, parts in seen.items()} for seen in stages]


def spectrum(rows: np.ndarray) -> dict:
    """:func:`reference.spectrum_reference` of the rows' two-pass covariance (NaN with under 2 rows)."""
    if rows.shape[0] < 2:
        nan = np.full(rows.shape[1], np.nan)
        return {"se": math.nan, "pr": math.nan, "eee": math.nan, "p": nan}
    return spectrum_reference(np.linalg.eigvalsh(two_pass(rows)))


def padded_js(p: np.ndarray, q: np.ndarray) -> float:
    """JS (SciPy, squared distance) of two normalised descending spectra, the shorter zero-padded."""
    n = max(len(p), len(q))
    return float(jensenshannon(np.pad(p, (0, n - len(p))), np.pad(q, (0, n - len(q)))) ** 2)


def metrics(pre: np.ndarray, post: np.ndarray) -> dict[str, float]:
    if pre.shape[0] < 2:
        return dict.fromkeys(("se_pre", "se_post", "pr_pre", "pr_post", "eee_pre", "eee_post", "js"), math.nan)
    return activation_metrics(pre, post)


def flow_metrics(stages: dict[str, np.ndarray]) -> dict:
    """The flow keys of one site from its four stages."""
    spectra = {name: spectrum(stages[name]) for name in ("input", "pre", "post", "output")}
    out = {"dim_input": stages["input"].shape[1]}
    for stage in ("input", "output"):
        out.update({f"{metric}_{stage}": spectra[stage][metric] for metric in ("se", "pr", "eee")})
    out["js_input_pre"] = padded_js(spectra["input"]["p"], spectra["pre"]["p"])
    out["js_post_output"] = padded_js(spectra["post"]["p"], spectra["output"]["p"])
    return out


def process_rows(model, scenario: Scenario, batch: dict) -> list[dict[str, np.ndarray]]:
    """What one process feeding ``batch`` counts: its captured rows, cut to its first ``max_tokens``."""
    cap = scenario.max_tokens  # None: every row
    return [{name: rows[:cap] for name, rows in stages.items()} for stages in capture(model, scenario.family, batch)]


def expected_report(model, scenario: Scenario, shares: list[dict]) -> dict:
    """The report of ``scenario`` when each batch of ``shares`` is fed by its own process and the
    statistics are summed: the rows and position rows of the tracked FFNs."""
    counted = [process_rows(model, scenario, share) for share in shares]
    rows, positions = [], []
    for layer in scenario.tracked_layers():
        stages = {name: np.concatenate([c[layer][name] for c in counted]) for name in counted[0][layer]}
        site = {"site": f"ffn.{layer}", "layer": layer, "dim": FFN_WIDTH}
        row = {**site, "kind": "dense", "tokens": stages["pre"].shape[0], **metrics(stages["pre"], stages["post"])}
        if scenario.flow:
            row.update(flow_metrics(stages))
        rows.append(row)
        edges = scenario.position_buckets or ()
        for start, end in zip(edges, [*edges[1:], None]):
            chosen = (stages["positions"] >= start) & (stages["positions"] < (end if end is not None else math.inf))
            positions.append(
                {
                    **site,
                    "bucket": f"{start}-{'inf' if end is None else end}",
                    "position_start": start,
                    "position_end": end,
                    "tokens": int(chosen.sum()),
                    **metrics(stages["pre"][chosen], stages["post"][chosen]),
                }
            )
    return {"rows": rows, "positions": positions}


# ----------------------------------------------------------------------------- comparison
def assert_same_row(got: dict, want: dict, rel: float = 1e-9, abs: float = 1e-12) -> None:
    """Exactly the keys of ``want``; its integer and text fields equal, every metric within ``rel``/``abs``."""
    assert set(got) == set(want), (want.get("site"), sorted(set(got) ^ set(want)))
    for key, value in want.items():
        if key in INTEGER_KEYS or isinstance(value, str):  # counts, names and the kind: equal
            assert got[key] == value, (want["site"], want.get("bucket"), key)
        else:
            assert math.isfinite(value), f"the scenario leaves {want['site']} {key} undefined"
            assert got[key] == pytest.approx(value, rel=rel, abs=abs), (want["site"], want.get("bucket"), key)


def assert_same_report(got: dict, want: dict, **tolerance) -> None:
    """Rows and position rows of ``got`` (a :func:`report_dict`) equal ``want``, in the same order."""
    for part in ("rows", "positions"):
        assert [(r["site"], r.get("bucket")) for r in got[part]] == [(r["site"], r.get("bucket")) for r in want[part]]
        for row, expected in zip(got[part], want[part]):
            assert_same_row(row, expected, **tolerance)


def site_part(report: dict, site: str) -> dict:
    """The rows and position rows of one site."""
    return {part: [row for row in report[part] if row["site"] == site] for part in ("rows", "positions")}
