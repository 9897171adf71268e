"""model_adapters: the table, the structural detector, the error for unknown models, registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import model_adapters
from model_adapters import Adapter, FFNSite, get_adapter, register_adapter, resolve_sites
from nerve_hf.tracking.tracker import FFNTracker
from tests.tracking.test_tracker import FAMILIES, _lin, assert_rows_match, build

TABLE_FAMILIES = sorted(FAMILIES) + ["MlpMixer"]


def test_table_covers_every_required_family():
    assert set(TABLE_FAMILIES) <= set(model_adapters.supported_types())


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "phi3", "bert"])
def test_table_sites_resolve_on_base_and_head_models(family):
    import transformers

    head = build(family)
    base = transformers.AutoModel.from_config(head.config)
    for model in (head, base):
        sites = resolve_sites(model, get_adapter(model))
        assert [s.site for s in sites] == ["ffn.0", "ffn.1"]
        assert [s.layer for s in sites] == [0, 1]


def test_phi3_pre_is_the_gate_half():
    (site,) = get_adapter(build("phi3")).sites
    assert site.pre == "mlp.gate_up_proj" and site.pre_chunk == (0, 2)


class _MLP(nn.Module):
    def __init__(self, d, h, gated=False, names=("up", "act", "down")):
        super().__init__()
        up, act, down = names
        if gated:
            self.w_gate = nn.Linear(d, h)
        setattr(self, up, nn.Linear(d, h))
        setattr(self, act, nn.GELU())
        setattr(self, down, nn.Linear(h, d))
        self.names, self.gated = names, gated

    def forward(self, x):
        up, act, down = (getattr(self, n) for n in self.names)
        hidden = act(self.w_gate(x)) * up(x) if self.gated else act(up(x))
        return down(hidden)


class _Block(nn.Module):
    def __init__(self, d, h, **kw):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn_proj = nn.Linear(d, d)  # not FFN-shaped: no activation next to it
        self.ffn = _MLP(d, h, **kw)

    def forward(self, x):
        x = x + self.attn_proj(self.norm(x))
        return x + self.ffn(self.norm(x))


class CustomNet(nn.Module):
    def __init__(self, d=16, h=23, n=3, **kw):
        super().__init__()
        self.stack = nn.ModuleList([_Block(d, h, **kw) for _ in range(n)])

    def forward(self, x):
        for block in self.stack:
            x = block(x)
        return x


def test_detector_finds_custom_linear_gelu_linear():
    torch.manual_seed(0)
    model = CustomNet()
    adapter = get_adapter(model)
    assert adapter == Adapter(sites=(FFNSite("ffn", "stack", "ffn.up", "ffn.down"),), gated=False)
    model.double()  # float64 end to end: the rank-deficient pre spectra (h=23 > d=16) stay exact
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    captured = {}
    for i, block in enumerate(model.stack):
        block.ffn.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach().double()))
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        model(x)
    reference = {}
    for i, block in enumerate(model.stack):
        pre = _lin(block.ffn.up, captured[i].reshape(-1, 16)).detach()
        reference[f"ffn.{i}"] = (pre.numpy(), torch.nn.functional.gelu(pre).numpy())
    assert_rows_match(tracker.compute(), reference)


def test_detector_gated_prefers_gate_named_projection():
    adapter = model_adapters.detect_adapter(CustomNet(gated=True))
    assert adapter.gated and adapter.sites[0].pre == "ffn.w_gate" and adapter.sites[0].post == "ffn.down"


def test_detector_on_gpt2_conv1d_matches_table():
    model = build("gpt2")
    detected = model_adapters.detect_adapter(model)
    table = get_adapter(model)
    assert [(s.site, s.pre_path, s.post_path) for s in resolve_sites(model, detected)] == [
        (s.site, s.pre_path, s.post_path) for s in resolve_sites(model, table)
    ]


class _NoFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


def test_unknown_model_error_names_class_types_and_fix():
    with pytest.raises(ValueError) as info:
        get_adapter(_NoFFN())
    message = str(info.value)
    assert "_NoFFN" in message
    assert "gpt2" in message and "llama" in message and "MlpMixer" in message
    assert "model_adapters.register_adapter(" in message and "'_NoFFN'" in message
    assert "FFNSite(" in message


def test_register_adapter_by_class_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(4, 6), "b": nn.Linear(6, 4)}) for _ in range(2)])

        def forward(self, x):
            for layer in self.body:
                x = layer["b"](torch.tanh(layer["a"](x)))
            return x

    model = Odd()
    with pytest.raises(ValueError, match="register_adapter"):
        get_adapter(model)
    adapter = Adapter(sites=(FFNSite("mlp", "body", pre="a", post="b"),))
    register_adapter("Odd", adapter)
    try:
        assert get_adapter(model) is adapter
        with pytest.raises(ValueError, match="already registered"):
            register_adapter("Odd", adapter)
        tracker = FFNTracker(model, flow=False)
        with tracker:
            model(torch.randn(5, 4))
        assert [(r["site"], r["tokens"], r["dim"]) for r in tracker.compute().rows] == [
            ("mlp.0", 5, 6),
            ("mlp.1", 5, 6),
        ]
    finally:
        model_adapters.registry._REGISTRY.pop("Odd")


def test_mismatched_pre_post_widths_raise():
    model = CustomNet()
    bad = Adapter(sites=(FFNSite("ffn", "stack", pre="ffn.up", post="attn_proj"),))
    with pytest.raises(ValueError, match="differ"):
        FFNTracker(model, adapter=bad)


def test_adapter_that_does_not_fit_raises():
    with pytest.raises(ValueError, match="does not fit"):
        resolve_sites(CustomNet(), Adapter(sites=(FFNSite("ffn", "layers", "mlp.c_fc", "mlp.c_proj"),)))
