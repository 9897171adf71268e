"""FFNTracker against an independent float64 reference, for every supported family.

The reference captures only the *input* of each FFN with its own hook, recomputes pre and post by
hand from the module weights in float64, and computes covariance and metrics with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from reference import activation_metrics
from torch import nn

from nerve_hf.report import METRIC_NAMES, ROW_KEYS
from nerve_hf.tracking.tracker import FFNTracker

HIDDEN, FFN, LAYERS, HEADS, VOCAB = 32, 37, 2, 4, 101
LENGTHS = (17, 12, 15, 9)  # real tokens per sequence of the test batch (53 > FFN, so full rank)


# ----------------------------------------------------------------------------- float64 reference
def ref_metrics(pre: np.ndarray, post: np.ndarray) -> dict[str, float]:
    """NerVE metrics (DESIGN §1) of activation rows, from the shared NumPy/SciPy float64 reference."""
    return activation_metrics(pre, post)


def assert_rows_match(report, reference: dict[str, tuple[np.ndarray, np.ndarray]], rtol=1e-5):
    """Every report row equals the reference metrics of its site's hand-computed pre/post rows."""
    assert [row["site"] for row in report.rows] == list(reference)
    for row in report.rows:
        pre, post = reference[row["site"]]
        assert set(row) == set(ROW_KEYS)
        assert row["tokens"] == pre.shape[0] == post.shape[0]
        assert row["dim"] == pre.shape[1]
        expected = ref_metrics(pre, post)
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(expected[name], rel=rtol, abs=1e-7), (row["site"], name)
        eig_pre, eig_post = report.eigenvalues[row["site"]]
        assert eig_pre.dtype == torch.float64 and eig_pre.device.type == "cpu"
        assert bool((eig_pre[:-1] >= eig_pre[1:]).all()) and bool((eig_post[:-1] >= eig_post[1:]).all())


# ----------------------------------------------------------------------------- families
def _lin(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float64 Linear by hand: x W^T + b.  [N, d] -> [N, h]"""
    bias = module.bias.double() if module.bias is not None else None
    return F.linear(x, module.weight.double(), bias)


def _conv1d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float64 GPT-2 Conv1D by hand: x W + b (weight is [in, out])."""
    return x @ module.weight.double() + module.bias.double()


def _dense(up: str, act: str, conv=False):
    """(pre, post) of a plain FFN: pre = up(x), post = act(pre)."""

    def fn(mlp, x):
        pre = (_conv1d if conv else _lin)(getattr(mlp, up), x)
        return pre, getattr(mlp, act)(pre)

    return fn


def _gated(mlp, x):
    """LLaMA family: pre = gate_proj(x), post = act(gate_proj(x)) * up_proj(x)."""
    gate = _lin(mlp.gate_proj, x)
    return gate, mlp.act_fn(gate) * _lin(mlp.up_proj, x)


def _phi3(mlp, x):
    """Phi-3 fused gate_up_proj: the first half of the output is the gate."""
    fused = _lin(mlp.gate_up_proj, x)  # [N, 2 * d_ff]
    gate, up = fused[:, :FFN], fused[:, FFN:]
    return gate, mlp.activation_fn(gate) * up


_DECODER = dict(
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    head_dim=HIDDEN // HEADS,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
_GPT = dict(
    n_embd=HIDDEN,
    n_inner=FFN,
    n_layer=LAYERS,
    n_head=HEADS,
    vocab_size=VOCAB,
    n_positions=64,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
_ENCODER = dict(
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

# model_type -> (config kwargs, auto class, blocks getter, FFN-input module in a block, (mlp, x) -> (pre, post))
FAMILIES = {
    "gpt2": (_GPT, "AutoModelForCausalLM", lambda m: m.transformer.h, "mlp", _dense("c_fc", "act", conv=True)),
    "gptj": (
        {**_GPT, "rotary_dim": 4},
        "AutoModelForCausalLM",
        lambda m: m.transformer.h,
        "mlp",
        _dense("fc_in", "act"),
    ),
    "gpt_neox": (
        {**_DECODER, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "AutoModelForCausalLM",
        lambda m: m.gpt_neox.layers,
        "mlp",
        _dense("dense_h_to_4h", "act"),
    ),
    "opt": (
        dict(
            hidden_size=HIDDEN,
            ffn_dim=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            word_embed_proj_dim=HIDDEN,
            dropout=0.0,
        ),
        "AutoModelForCausalLM",
        lambda m: m.model.decoder.layers,
        None,
        _dense("fc1", "activation_fn"),
    ),
    "phi": (
        {**_DECODER, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
        "AutoModelForCausalLM",
        lambda m: m.model.layers,
        "mlp",
        _dense("fc1", "activation_fn"),
    ),
    **{
        family: (_DECODER, "AutoModelForCausalLM", lambda m: m.model.layers, "mlp", _gated)
        for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
    },
    "phi3": ({**_DECODER, "pad_token_id": 0}, "AutoModelForCausalLM", lambda m: m.model.layers, "mlp", _phi3),
    "bert": (_ENCODER, "AutoModel", lambda m: m.encoder.layer, "intermediate", _dense("dense", "intermediate_act_fn")),
    "roberta": (
        {**_ENCODER, "pad_token_id": 1},
        "AutoModel",
        lambda m: m.encoder.layer,
        "intermediate",
        _dense("dense", "intermediate_act_fn"),
    ),
}


def build(family: str, seed: int = 0) -> nn.Module:
    """A tiny random model of ``family`` in eval mode (dropout-free either way)."""
    kwargs, auto, *_ = FAMILIES[family]
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(family, **kwargs)
    return getattr(transformers, auto).from_config(config).eval()


def batch(lengths=LENGTHS, side="right", seed=0):
    """input_ids/attention_mask/position_ids for sequences of ``lengths``, padded on ``side``."""
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(2, VOCAB, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, seq - n :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}


def captured_inputs(model, targets, inputs) -> dict:
    """layer -> the float64 input of ``targets[layer]`` in one no-grad forward of ``model`` on ``inputs``."""
    captured, hooks = {}, []
    for layer, target in enumerate(targets):

        def grab(module, args, layer=layer):
            captured[layer] = args[0].detach().double()  # [B, T, hidden] (OPT: [B*T, hidden])

        hooks.append(target.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def capture_reference(model, blocks, ffn_input: str | None, pre_post, inputs) -> dict:
    """Site -> (pre, post) float64 numpy rows of the real tokens, from hand-computed FFNs."""
    # OPT: the FFN input is fc1's input
    targets = [block.fc1 if ffn_input is None else getattr(block, ffn_input) for block in blocks]
    captured = captured_inputs(model, targets, inputs)
    keep = inputs["attention_mask"].reshape(-1).bool()
    reference = {}
    for layer, block in enumerate(blocks):
        mlp = block if ffn_input is None else getattr(block, ffn_input)
        x = captured[layer].reshape(-1, captured[layer].shape[-1])[keep]  # [N, hidden]
        with torch.no_grad():
            pre, post = pre_post(mlp, x)
        reference[f"ffn.{layer}"] = (pre.numpy(), post.numpy())
    return reference


def run_tracker(model, *inputs_list, **tracker_kwargs):
    tracker_kwargs.setdefault("flow", False)  # pre/post only unless a test asks for the flow
    tracker = FFNTracker(model, **tracker_kwargs)
    with tracker, torch.no_grad():
        for inputs in inputs_list:
            model(**inputs)
    return tracker.compute()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_float64_reference(family):
    model = build(family)
    _, _, blocks, ffn_input, pre_post = FAMILIES[family]
    inputs = batch(side="right")
    if family in ("bert", "roberta"):
        inputs.pop("position_ids")
    reference = capture_reference(model, blocks(model), ffn_input, pre_post, inputs)
    report = run_tracker(model, inputs)
    assert_rows_match(report, reference)
    assert all(row["tokens"] == sum(LENGTHS) for row in report.rows)


def test_timm_mlp_mixer_token_and_channel_sites():
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    model = MlpMixer(img_size=20, patch_size=4, embed_dim=24, num_blocks=2, num_classes=3).eval()
    images = torch.randn(6, 3, 20, 20)
    captured = {}
    hooks = [
        mlp.register_forward_pre_hook(lambda m, a, key=key: captured.__setitem__(key, a[0].detach().double()))
        for i, block in enumerate(model.blocks)
        for key, mlp in ((f"token_mlp.{i}", block.mlp_tokens), (f"channel_mlp.{i}", block.mlp_channels))
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        model(images)
    report = tracker.compute()
    reference = {}
    for site in ("token_mlp.0", "token_mlp.1", "channel_mlp.0", "channel_mlp.1"):
        family, layer = site.split(".")
        block = model.blocks[int(layer)]
        mlp = block.mlp_tokens if family == "token_mlp" else block.mlp_channels
        x = captured[site].reshape(-1, captured[site].shape[-1])  # token MLP: rows are (image, channel)
        pre = _lin(mlp.fc1, x)
        reference[site] = (pre.detach().numpy(), mlp.act(pre).detach().numpy())
    # The channel MLP's pre has rank 24 of 96: its 72 null eigenvalues hold float32 round-off of the
    # activations' scatter GEMM, which moves JS by ~2e-5 relative; everything else agrees to 1e-5.
    assert_rows_match(report, reference, rtol=1e-4)
    assert {row["site"]: row["tokens"] for row in report.rows} == {
        "token_mlp.0": 6 * 24,
        "token_mlp.1": 6 * 24,
        "channel_mlp.0": 6 * 25,
        "channel_mlp.1": 6 * 25,
    }
    assert {row["site"]: row["dim"] for row in report.rows} == {
        "token_mlp.0": 12,
        "token_mlp.1": 12,
        "channel_mlp.0": 96,
        "channel_mlp.1": 96,
    }


# ----------------------------------------------------------------------------- padding
# BERT has absolute positions it derives itself, so only right padding preserves its activations.
@pytest.mark.parametrize(
    "family,side", [("gpt2", "left"), ("gpt2", "right"), ("llama", "left"), ("llama", "right"), ("bert", "right")]
)
def test_padding_equals_unpadded_sequences(family, side):
    model = build(family)
    padded = batch(side=side)
    if family == "bert":
        padded.pop("position_ids")
    singles = []
    for i, _n in enumerate(LENGTHS):
        keep = padded["attention_mask"][i].bool()
        singles.append({key: value[i][keep][None] for key, value in padded.items()})
    report_padded = run_tracker(model, padded)
    report_single = run_tracker(model, *singles)
    for a, b in zip(report_padded.rows, report_single.rows):
        assert a["tokens"] == b["tokens"] == sum(LENGTHS)
        for name in METRIC_NAMES:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-7), (a["site"], name)


def test_padding_changes_result_without_mask():
    """Sanity: the mask matters (pads would otherwise enter the covariance)."""
    model = build("gpt2")
    inputs = batch(side="right")
    with_mask = run_tracker(model, inputs)
    no_mask = run_tracker(model, {"input_ids": inputs["input_ids"]})
    assert no_mask.rows[0]["tokens"] == inputs["input_ids"].numel() != with_mask.rows[0]["tokens"]
    assert no_mask.rows[0]["pr_pre"] != pytest.approx(with_mask.rows[0]["pr_pre"], rel=1e-3)


def test_positional_attention_mask_is_used():
    model = build("gpt2")
    inputs = batch(side="right")
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        # GPT2LMHeadModel.forward(input_ids, past_key_values, attention_mask, ...)
        model(inputs["input_ids"], None, inputs["attention_mask"])
    assert tracker.compute().rows[0]["tokens"] == sum(LENGTHS)


def test_mismatched_mask_warns_once_and_counts_all_rows():
    from timm.models.mlp_mixer import MlpMixer

    class Wrapper(nn.Module):  # accepts an attention_mask its activations do not share
        def __init__(self):
            super().__init__()
            self.mixer = MlpMixer(img_size=8, patch_size=4, embed_dim=8, num_blocks=1, num_classes=2)

        def forward(self, x, attention_mask=None):
            return self.mixer(x)

    model = Wrapper()
    tracker = FFNTracker(model, adapter=__import__("model_adapters").get_adapter(model.mixer), flow=False)
    with tracker, pytest.warns(RuntimeWarning, match="does not match"):
        model(torch.randn(2, 3, 8, 8), attention_mask=torch.ones(2, 5))
    assert tracker.compute().rows[0]["tokens"] == 2 * 8  # token MLP rows: images x channels


# ----------------------------------------------------------------------------- token accounting
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_counts_each_token_once(use_reentrant):
    model = build("llama")
    inputs = batch(side="right")
    expected = run_tracker(model, inputs)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    tracker = FFNTracker(model, flow=False)
    with tracker:
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
    report = tracker.compute()
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None
    for a, b in zip(report.rows, expected.rows):
        assert a["tokens"] == sum(LENGTHS)
        for name in METRIC_NAMES:
            assert a[name] == pytest.approx(b[name], rel=1e-5)


def test_max_tokens_keeps_same_first_tokens_for_pre_and_post():
    model = build("gpt2")
    inputs = batch(side="left")
    reference = capture_reference(model, model.transformer.h, "mlp", FAMILIES["gpt2"][4], inputs)
    report = run_tracker(model, inputs, inputs, max_tokens=40)
    # The first 40 real tokens in row-major order of the first batch; the second batch adds nothing.
    assert_rows_match(report, {site: (pre[:40], post[:40]) for site, (pre, post) in reference.items()})


def test_layers_selection_and_accumulation_across_enters():
    model = build("gpt2")
    inputs = batch()
    tracker = FFNTracker(model, layers=[-1], flow=False)
    assert [site.site for site in tracker.sites] == ["ffn.1"]
    for _ in range(2):
        with tracker, torch.no_grad():
            model(**inputs)
    assert tracker.compute().rows[0]["tokens"] == 2 * sum(LENGTHS)
    tracker.reset()
    report = tracker.compute()
    assert report.rows[0]["tokens"] == 0 and np.isnan(report.rows[0]["pr_pre"])
    with pytest.raises(ValueError, match="out of range"):
        FFNTracker(model, layers=[2], flow=False)


def test_calls_outside_the_tracked_forward_are_not_counted():
    model = build("gpt2")
    tracker = FFNTracker(model, flow=False)
    with tracker, pytest.warns(RuntimeWarning, match="outside a forward"):
        model.transformer.h[0].mlp(torch.randn(2, 3, HIDDEN))
    assert tracker.compute().rows[0]["tokens"] == 0


# ----------------------------------------------------------------------------- hook lifecycle
def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_exception_and_reentry_works():
    model = build("gpt2")
    before = _hook_count(model)
    tracker = FFNTracker(model, flow=False)
    with pytest.raises(RuntimeError, match="boom"):
        with tracker:
            assert _hook_count(model) > before
            raise RuntimeError("boom")
    assert _hook_count(model) == before and not tracker.active
    with pytest.raises((IndexError, RuntimeError)):  # an exception inside the model's own forward
        with tracker:
            model(input_ids=torch.full((1, 3), VOCAB + 5))
    assert _hook_count(model) == before
    inputs = batch()
    with tracker, torch.no_grad():
        model(**inputs)
        with pytest.raises(RuntimeError, match="already attached"):
            tracker.attach()
    assert tracker.compute().rows[0]["tokens"] == sum(LENGTHS)


def test_inference_mode_and_bf16_autocast():
    model = build("llama")
    inputs = batch()
    expected = run_tracker(model, inputs)
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.inference_mode():
        model(**inputs)
    for a, b in zip(tracker.compute().rows, expected.rows):
        assert a["tokens"] == b["tokens"] and a["pr_pre"] == pytest.approx(b["pr_pre"], rel=1e-5)
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs)
    for a, b in zip(tracker.compute().rows, expected.rows):
        assert a["tokens"] == b["tokens"]
        assert a["pr_pre"] == pytest.approx(b["pr_pre"], rel=0.1)  # bf16 activations, same spectrum shape
        assert a["se_post"] == pytest.approx(b["se_post"], rel=0.05)


def test_report_helpers():
    model = build("gpt2")
    report = run_tracker(model, batch())
    frame = report.to_pandas()
    assert list(frame.columns) == list(ROW_KEYS) and len(frame) == LAYERS
    logs = report.to_log_dict()
    assert logs["nerve/ffn.1/js"] == report.rows[1]["js"]
    assert logs["nerve/mean/pr_pre"] == pytest.approx(np.mean([row["pr_pre"] for row in report.rows]))
    assert len(logs) == (LAYERS + 1) * len(METRIC_NAMES)
    assert all(type(row["tokens"]) is int and type(row["se_pre"]) is float for row in report.rows)


def test_width_learned_lazily_when_modules_are_not_linear():
    from model_adapters import Adapter, FFNSite

    class Proj(nn.Module):  # not an nn.Linear: the tracker cannot read its width up front
        def __init__(self, d_in, d_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_in, d_out))

        def forward(self, x):
            return x @ self.weight

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict({"up": Proj(6, 11), "down": Proj(11, 6)})])

        def forward(self, x):
            block = self.blocks[0]
            return block["down"](torch.relu(block["up"](x)))

    torch.manual_seed(0)
    model = Net()
    tracker = FFNTracker(model, adapter=Adapter(sites=(FFNSite("ffn", "blocks", "up", "down"),)), flow=False)
    empty = tracker.compute().rows[0]
    assert (empty["dim"], empty["tokens"]) == (0, 0) and np.isnan(empty["se_pre"])
    x = torch.randn(40, 6)
    with tracker, torch.no_grad():
        model(x)
    pre = (x.double() @ model.blocks[0]["up"].weight.double()).detach()
    assert_rows_match(tracker.compute(), {"ffn.0": (pre.numpy(), torch.relu(pre).numpy())})


def test_when_predicate_records_only_chosen_forwards():
    model = build("gpt2")
    inputs = batch()
    eval_only = FFNTracker(model, when=lambda module: not module.training, flow=False)
    everything = FFNTracker(model, flow=False)
    with eval_only, everything, torch.no_grad():
        model.train()
        model(**inputs)
        model.eval()
        model(**inputs)
    real = int(inputs["attention_mask"].sum())
    assert [row["tokens"] for row in eval_only.compute().rows] == [real, real]
    assert [row["tokens"] for row in everything.compute().rows] == [2 * real, 2 * real]
