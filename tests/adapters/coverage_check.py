"""One class of the coverage sweep: measured right, or refused with a reason, or a failure that says why.

The check knows nothing of the adapter table. It runs the model once with its own hooks on every linear
module and finds the FFNs by their values: a pair of linears (up, down) whose down input equals
``act(up output)`` (dense), or ``act(gate output) * up output`` (gated, fused gate/up included), for some
activation of ``transformers.activations.ACT2FN``. Then each measured row must be such a pair (pre = the
up/gate output, post = the down input), over the real tokens only, with the metrics of the float64
reference; and every such pair that ran on the text must be measured.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import model_adapters
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.tracking.tracker import FFNTracker
from tests.reference import activation_metrics

LENGTHS = (9, 6)  # two sequences, the second right-padded: 15 real tokens of 18 rows
DECODER_LENGTHS = (4, 7)  # an encoder-decoder's targets: another length, the first padded (11 of 14)
_NOT_ACTIVATIONS = {"linear", "identity", None}
# Path segments of modules that never hold an FFN: attention, routers, (gates of) norms.
_FORBIDDEN = re.compile(r"(^|\.)(\w*attn\w*|\w*attention\w*|\w*router\w*|\w*norm\w*)(\.|$)")


def forbidden(path: str) -> bool:
    """Is the module that holds ``path`` inside its block (its parents below the block index, not the
    projection itself) attention, a router or a norm? A BitNet FFN's post is its sub-norm's input, so the
    last segment is not judged; the model's own name (``roberta_prelayernorm``) is above the block."""
    inner = re.sub(r"^.*\.\d+\.", "", path)
    return "." in inner and bool(_FORBIDDEN.search(inner.rsplit(".", 1)[0]))


def _activations() -> dict[str, nn.Module]:
    from transformers.activations import ACT2FN

    acts = {}
    for name in ACT2FN:
        try:
            act = ACT2FN[name]
        except Exception:  # activations whose package is not installed
            continue
        if name not in _NOT_ACTIVATIONS and not isinstance(act, nn.Identity):
            acts[name] = act
    return acts


ACTS = _activations()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return False
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * (1 + float(b.abs().max()))))


def _activated(p: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
    """act(p) for every activation (of ``names``; None: all) that accepts a float64 tensor."""
    out = {}
    with torch.no_grad():
        for name, act in ACTS.items():
            if names is not None and name not in names:
                continue
            try:
                out[name] = act(p)
            except RuntimeError:  # parameterised activations (PReLU) of float32 weights
                continue
    return out


def text_inputs(model: nn.Module) -> dict:
    """input_ids/attention_mask of two right-padded sequences, ids away from every special token id."""
    config = model.config
    text = getattr(config, "get_text_config", lambda **_: config)(decoder=True)
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", 128)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 100), (len(LENGTHS), max(LENGTHS)), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "is_encoder_decoder", False):
        dec = torch.zeros(len(DECODER_LENGTHS), max(DECODER_LENGTHS), dtype=torch.long)
        for i, n in enumerate(DECODER_LENGTHS):
            dec[i, :n] = 1
        inputs["decoder_input_ids"] = torch.randint(3, min(vocab, 100), dec.shape, generator=gen)
        inputs["decoder_attention_mask"] = dec
    return inputs


class Capture:
    """Inputs and outputs of every linear of ``model`` in one forward (the last call of each, float64)."""

    def __init__(self, model: nn.Module, extra: tuple[str, ...] = ()):
        self.index = model_adapters.unwrap.module_index(model)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self._sibling_cache: dict[str, list[torch.Tensor]] = {}
        self._act_cache: dict = {}
        self._hooks = [
            module.register_forward_hook(self._hook(path))
            for path, module in self.index.items()
            if model_adapters.linear_dims(module) is not None or path in extra
        ]

    def _hook(self, path):
        def hook(module, args, output):
            if args and torch.is_tensor(args[0]) and torch.is_tensor(output):
                self.inputs[path], self.outputs[path] = args[0].detach().double(), output.detach().double()
                self.calls[path] = self.calls.get(path, 0) + 1

        return hook

    def head(self, rows: int = 4) -> "Capture":
        """A copy holding only the first ``rows`` rows of every tensor: a cheap first filter for pairs."""
        small = object.__new__(Capture)
        small.index, small.calls, small._hooks = self.index, self.calls, []
        small.inputs = {k: v.reshape(-1, v.shape[-1])[:rows] for k, v in self.inputs.items() if v.dim()}
        small.outputs = {k: v.reshape(-1, v.shape[-1])[:rows] for k, v in self.outputs.items() if v.dim()}
        small._sibling_cache, small._act_cache = {}, {}
        return small

    def remove(self):
        for hook in self._hooks:
            hook.remove()

    def _siblings(self, pre: str) -> list[torch.Tensor]:
        """Outputs of the other linears that read the same input tensor as ``pre`` (up beside gate)."""
        if pre not in self._sibling_cache:
            x = self.inputs[pre]
            self._sibling_cache[pre] = [
                self.outputs[path]
                for path, inp in self.inputs.items()
                if path != pre and inp.shape == x.shape and torch.equal(inp, x)
            ]
        return self._sibling_cache[pre]

    def _acts(self, pre: str, pre_chunk, names=None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """act(pre output) for every activation (of ``names``), and the other chunks of a fused output."""
        key = (pre, pre_chunk, names)
        if key not in self._act_cache:
            p, others = self.outputs[pre], []
            if pre_chunk is not None:
                index, chunks = pre_chunk
                parts = p.chunk(chunks, dim=-1)
                p, others = parts[index], [part for i, part in enumerate(parts) if i != index]
            self._act_cache[key] = (_activated(p, names), others)
        return self._act_cache[key]

    def ffn_relation(self, pre: str, post: str, pre_chunk=None, names=None) -> str | None:
        """How post's input follows from pre's output ("dense act" / "gated act"), or None if it does not;
        ``names``: the activations to try (None: all)."""
        found = self.ffn_relations(pre, post, pre_chunk, names, first=True)
        return found[0] if found else None

    def ffn_relations(self, pre: str, post: str, pre_chunk=None, names=None, first=False) -> list[str]:
        """Every (or the ``first``) relation by which post's input follows from pre's output."""
        if pre not in self.outputs or post not in self.inputs:
            return []
        q, found = self.inputs[post], []
        acts, others = self._acts(pre, pre_chunk, names)
        for name, a in acts.items():
            if a.shape != q.shape:
                return []
            if _close(q, a):
                found.append(f"dense {name}")
            elif any(u.shape == a.shape and _close(q, a * u) for u in others + self._siblings(pre)):
                found.append(f"gated {name}")
            if found and first:
                break
        return found

    def ffn_pairs(self) -> set[tuple[str, str]]:
        """Every (pre, post) pair of linears whose values make an FFN, by :meth:`ffn_relation`."""
        pairs, head = set(), self.head()
        for post, q in self.inputs.items():
            for pre, p in self.outputs.items():
                if pre == post or p.shape[:-1] != q.shape[:-1] or post not in head.inputs or pre not in head.outputs:
                    continue
                if forbidden(pre) or forbidden(post):  # a router's or a gated norm's MLP is not an FFN
                    continue
                if _block(pre) is None or _block(pre) != _block(post):  # heads and projectors are not blocks
                    continue
                if p.shape[-1] == q.shape[-1]:
                    chunks = [None]
                elif p.shape[-1] == 2 * q.shape[-1]:
                    chunks = [(0, 2), (1, 2)]
                else:
                    continue
                for chunk in chunks:  # the full rows only for the activations that hold on the first ones
                    names = tuple(r.split()[1] for r in head.ffn_relations(pre, post, chunk))
                    if names and self.ffn_relation(pre, post, chunk, names):
                        pairs.add((pre, post))
                        break
        return pairs


def _block(path: str) -> str | None:
    """The block a module belongs to: its path up to the last index (``model.layers.3``), else None."""
    match = re.match(r"(.*\.\d+)\.", path)
    return match.group(1) if match else None


def real_rows(x: torch.Tensor, inputs: dict, window_padded: bool = False) -> torch.Tensor:
    """Rows of an activation ``[batch, seq, h]`` at the real positions of the mask of its shape -> ``[N, h]``
    (the encoder's or the decoder's: the test gives them different lengths); with ``window_padded`` (a
    Longformer-style config with an ``attention_window``: LED pads its input on the right to a multiple of
    it) a source activation longer than its mask has the mask extended with padding; other shapes: every row."""
    for key in ("attention_mask", "decoder_attention_mask"):
        mask = inputs.get(key)
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.bool()]
        if mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():  # flattened (OPT's fc1)
            return x[mask.reshape(-1).bool()]
    mask = inputs.get("attention_mask")
    if (
        window_padded
        and mask is not None
        and x.dim() == 3
        and x.shape[0] == mask.shape[0]
        and x.shape[1] > mask.shape[1]
    ):
        return x[torch.nn.functional.pad(mask.bool(), (0, x.shape[1] - mask.shape[1]), value=False)]
    return x.reshape(-1, x.shape[-1])


def is_moe(config) -> bool:
    """Does the config (or a sub-config) declare routed experts? An explicit ``is_moe`` flag decides
    (Doge keeps ``num_experts`` in its dense configs)."""
    if isinstance(getattr(config, "is_moe", None), bool):
        return config.is_moe
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
    for value in vars(config).values():
        if hasattr(value, "to_dict") and value is not config and is_moe(value):
            return True
    return any(isinstance(getattr(config, k, None), int) and getattr(config, k) > 1 for k in keys)


def check(model: nn.Module) -> str:
    """``"refused: <message>"`` or ``"measured: <n> sites"``; raises AssertionError when wrong or silent."""
    inputs = text_inputs(model)
    try:
        adapter = model_adapters.get_adapter(model)
    except ValueError as error:
        message = str(error)
        assert re.search(r"no FFN|not an FFN|refus|register_adapter", message, re.IGNORECASE), message
        return f"refused: {message.splitlines()[0]}"
    sites = {s.site: s for s in model_adapters.resolve_sites(model, adapter)}
    capture = Capture(model, extra=tuple(p for s in sites.values() for p in (s.pre_path, s.post_path)))
    try:
        tracker = FFNTracker(model, adapter=adapter, flow=False)
        with tracker, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**inputs)
        report = tracker.compute()
    finally:
        capture.remove()
    assert report.rows, "measured nothing"
    moe = is_moe(model.config)
    check_routed_experts(report, inputs)
    assert any(row["tokens"] > 0 for row in report.rows), "no measured FFN ran on the text"
    for row in report.rows:
        if row.get("kind") == "expert":
            continue  # routed experts: check_routed_experts
        site = sites[row["site"]]
        where = f"{row['site']} ({site.pre_path} -> {site.post_path})"
        assert not forbidden(site.pre_path) and not forbidden(site.post_path), f"not an FFN: {where}"
        if row["tokens"] == 0:  # a stack that does not run on text (a vision tower): it must say so
            assert site.pre_path not in capture.calls, f"{where}: 0 tokens, but it ran"
            assert all(not np.isfinite(row[name]) for name in METRIC_NAMES), f"{where}: metrics without tokens"
            continue
        relation = capture.ffn_relation(site.pre_path, site.post_path, site.pre_chunk)
        assert relation is not None, f"{where}: post is not act(pre) (or act(gate) * up): not an FFN"
        if moe:
            assert row.get("kind") in ("shared_expert", "expert") or site.kind != "dense" or _says_dense(adapter), (
                f"{where}: a MoE model's row must say its kind (dense layer, shared or routed expert)"
            )
        assert capture.calls.get(site.pre_path) == 1, f"{where}: pre ran {capture.calls.get(site.pre_path)} times"
        padded = bool(getattr(model.config, "attention_window", None))
        pre = real_rows(_chunk(capture.outputs[site.pre_path], site.pre_chunk), inputs, padded).numpy()
        post = real_rows(capture.inputs[site.post_path], inputs, padded).numpy()
        assert row["tokens"] == pre.shape[0], f"{where}: {row['tokens']} tokens, {pre.shape[0]} real"
        expected = activation_metrics(pre, post)
        for name, value in expected.items():
            if np.isfinite(value):
                assert row[name] == pytest.approx(value, rel=2e-3, abs=1e-5), (where, name)
    measured = {(s.pre_path, s.post_path) for s in sites.values()}
    # Per-expert linears inside a routed-experts module (Switch Transformers' expert_{e}.wi/wo) are its expert rows.
    routed = tuple(s.pre_path + "." for s in sites.values() if s.kind == "expert")
    missed = {
        pair
        for pair in capture.ffn_pairs()
        if pair not in measured
        and pair[1] not in {p for _, p in measured}
        and not (routed and pair[0].startswith(routed))
    }
    assert not missed, f"FFNs that ran and are not measured: {sorted(missed)}"
    return f"measured: {len(report.rows)} sites"


def check_routed_experts(report, inputs: dict) -> None:
    """Routed experts (their values are checked against their own reference in tests/tracking/test_experts.py):
    every expert row says ``kind="expert"`` and its layer; per layer of routed experts, the routing row counts
    the real tokens of the text (the encoder's or the decoder's) and the expert rows' tokens add up to its
    (token, expert) assignments, at least one per token."""
    real = {int(inputs[key].sum()) for key in ("attention_mask", "decoder_attention_mask") if key in inputs}
    experts = [row for row in report.rows if row.get("kind") == "expert"]
    for routing in report.routing:
        family = routing["site"].rpartition(".")[0]
        rows = [r for r in experts if r["site"].partition("[")[0] == family and r["layer"] == routing["layer"]]
        where = f"{routing['site']} (routed experts)"
        assert rows, f"{where}: no expert row"
        assert routing["tokens"] in real, f"{where}: routed {routing['tokens']} tokens, real: {sorted(real)}"
        assert sum(r["tokens"] for r in rows) == routing["assignments"] >= routing["tokens"], (
            f"{where}: expert rows count {sum(r['tokens'] for r in rows)} of {routing['assignments']} assignments"
        )
    assert len({(r["site"].partition("[")[0], r["layer"]) for r in experts}) == len(report.routing), (
        "expert rows without their layer's routing row"
    )


def _says_dense(adapter) -> bool:
    """True when the adapter labels its sites explicitly (any kind other than the default somewhere)."""
    return any(site.kind != "dense" for site in adapter.sites)


def _chunk(x: torch.Tensor, pre_chunk) -> torch.Tensor:
    if pre_chunk is None:
        return x
    index, chunks = pre_chunk
    return x.chunk(chunks, dim=-1)[index]
