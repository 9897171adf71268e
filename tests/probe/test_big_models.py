"""Checkpoints that do not fit on one device (#31): device maps with CPU and disk offload, weights quantized
by optimum-quanto, torchao (int8 weights) and bitsandbytes (8- and 4-bit), all on the CPU, quantized fused
experts refused, and the memory plan made before the work. Every value is
checked against the whole, unquantized or own-hook float64 reference on the same tokens."""

import json

import numpy as np
import pytest
import torch
from isolated_packages import run_in_child
from reference import activation_metrics, assert_rows_equal

from nerve_hf import FFNTracker
from nerve_hf.cli import main
from nerve_hf.errors import InputError
from nerve_hf.probe import ProbeConfig, probe_model
from nerve_hf.probe.measure import load_checkpoint
from nerve_hf.probe.memory_plan import MemoryPlanError, plan_memory

N_LAYERS = 3
TEXT = "\n".join(f"def step_{i}(x, y={i}):\n    return (x * {i} + y) % {i % 5 + 2}\n" for i in range(60))
# some blocks resident on the CPU, the others offloaded to disk (accelerate moves them in for the forward)
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "disk",
    "lm_head": "cpu",
}
INT8 = {
    "quant_method": "torchao",
    "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_version": 2, "_data": {}}},
}
ROUND_OFF = dict(rel=1e-5, abs=1e-7)  # float32 activations, float64 statistics


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")


def _save_llama(path, hidden: int = 24, ffn: int = 37):
    """A tiny random LLaMA with the corpus's tokenizer, saved with ``save_pretrained`` to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = _save_llama(tmp_path_factory.mktemp("llama"))
    (path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    return path


def _batches(vocab: int, seed: int = 3) -> list[dict]:
    """Two batches of 3 sequences of 11 tokens, the last sequence of each padded on the right."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(3, vocab, (3, 11), generator=generator)
        mask = torch.ones_like(ids)
        mask[-1, 7:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _load(path, **kwargs):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def _own_rows(model, batches) -> list[dict]:
    """Reference rows from my own hooks: float64 gate_proj outputs (pre) and down_proj inputs (post) of every
    layer over the real tokens, metrics by NumPy/SciPy."""
    seen = [{"pre": [], "post": []} for _ in range(N_LAYERS)]
    keep = []

    def rows(x):
        return x.detach().reshape(-1, x.shape[-1])[keep[-1]].double().cpu().numpy()

    handles = []
    for layer, block in enumerate(model.model.layers):
        handles.append(
            block.mlp.gate_proj.register_forward_hook(lambda m, a, out, s=seen[layer]: s["pre"].append(rows(out)))
        )
        handles.append(
            block.mlp.down_proj.register_forward_pre_hook(lambda m, a, s=seen[layer]: s["post"].append(rows(a[0])))
        )
    try:
        with torch.no_grad():
            for batch in batches:
                keep.append(batch["attention_mask"].reshape(-1).bool())
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for layer, stages in enumerate(seen):
        pre, post = np.concatenate(stages["pre"]), np.concatenate(stages["post"])
        row = {"site": f"ffn.{layer}", "layer": layer, "dim": pre.shape[1], "tokens": pre.shape[0], "kind": "dense"}
        out.append(row | activation_metrics(pre, post))
    return out


# ------------------------------------------------------------------------------ device maps and offload
def test_device_map_with_disk_offload_measures_like_the_whole_model(llama_dir, tmp_path):
    whole = _load(llama_dir)
    placed = _load(llama_dir, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"))
    assert set(placed.hf_device_map.values()) == {"cpu", "disk"}
    assert placed.model.layers[2].mlp.gate_proj.weight.device.type == "meta"  # on disk until its forward
    batches = _batches(whole.config.vocab_size)
    want = probe_model(whole, batches, flow=False).rows
    got = probe_model(placed, batches, flow=False).rows
    assert_rows_equal(got, want, **ROUND_OFF)
    assert_rows_equal(got, _own_rows(placed, batches), **ROUND_OFF)
    assert placed.model.layers[2].mlp.gate_proj.weight.device.type == "meta"  # never moved
    assert placed.model.layers[0].mlp.gate_proj.weight.device.type == "cpu"


def test_auto_device_map_with_small_max_memory_through_run_probe_and_cli(llama_dir, tmp_path, capsys):
    from nerve_hf.probe import run_probe

    common = dict(text_file=str(llama_dir / "corpus.txt"), seq_len=16, max_tokens=300, progress=False, flow=False)
    whole = run_probe(ProbeConfig(str(llama_dir), **common))
    offload = tmp_path / "offload"
    config = ProbeConfig(
        str(llama_dir), device_map="auto", max_memory="cpu:40KB", offload_folder=str(offload), **common
    )
    config.progress = True  # the plan is printed with the progress bar
    placed = run_probe(config)
    assert "disk" in placed.model["device_map"].values() and "cpu" in placed.model["device_map"].values()
    assert placed.model["quantization"] is None and placed.settings["device"] == "cpu"
    assert whole.model["device_map"] is None
    assert_rows_equal(placed.report.rows, whole.report.rows, **ROUND_OFF)
    assert [row["tokens"] for row in placed.report.rows] == [300] * N_LAYERS
    assert "memory plan (MiB):" in capsys.readouterr().err
    plan = placed.settings["memory_plan"]
    assert {d["device"] for d in plan["devices"]} == {"cpu", "disk"}

    out = tmp_path / "out"
    args = ["--text-file", common["text_file"], "--seq-len", "16", "--max-tokens", "300", "--no-progress", "--no-flow"]
    device_map = json.dumps(DEVICE_MAP)
    flags = ["--device-map", device_map, "--offload-folder", str(offload), "--no-plots", "--out", str(out)]
    assert main(["probe", str(llama_dir), *args, *flags]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["device_map"] == DEVICE_MAP
    assert_rows_equal(report["rows"], whole.report.rows, **ROUND_OFF)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_memory": "cpu:1GiB"}, "give --device-map too"),
        ({"offload_folder": "x"}, "give --device-map too"),
        ({"device_map": "auto", "device": "cpu"}, "not both"),
        ({"device_map": "auto", "max_memory": "cpu=1GiB"}, "--max-memory must be"),
        ({"device_map": 3}, "--device-map must be"),
        ({"quantization": {"quant_method": "frobnicate"}}, "quant_method 'frobnicate' is refused"),
        ({"quantization": {"quant_method": "mxfp4"}}, "quant_method 'mxfp4' is refused: fused expert"),
    ],
)
def test_placement_options_refused_where_given(options, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        ProbeConfig("m", **options)


def test_prequantized_checkpoint_of_an_unreadable_method_refused_with_its_name(llama_dir, tmp_path):
    import shutil

    path = tmp_path / "packed"
    shutil.copytree(llama_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="quantization method 'mxfp4' cannot be measured"):
        load_checkpoint(ProbeConfig(str(path)))
    assert main(["probe", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2


# ------------------------------------------------------------------------------ quantized weights
# method, its package, the config nerve probe is given, the FFN projections as loaded
QUANTIZED = [
    # torchao and bitsandbytes are not in the test extra (importing them logs on stderr in every process that
    # imports transformers, which the one-line error tests forbid): their cases skip here and run in a child
    # process (test_quantization_backends_in_a_child_process)
    ("torchao", "torchao", INT8, "Linear(weight=Int8Tensor)"),
    ("quanto", "optimum.quanto", {"quant_method": "quanto", "weights": "int8"}, "QLinear(weight=WeightQBytesTensor)"),
    (
        "bitsandbytes",
        "bitsandbytes",
        {"quant_method": "bitsandbytes", "load_in_8bit": True},
        "Linear8bitLt(weight=Int8Params)",
    ),
    (
        "bitsandbytes",
        "bitsandbytes",
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
        "Linear4bit(weight=Params4bit)",
    ),
]


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """The checkpoint with widths that are multiples of 64: bitsandbytes' 4-bit CPU inference path reshapes
    each row's absmax into blocks of 64 input features (other widths fail in its own forward)."""
    return _save_llama(tmp_path_factory.mktemp("wide_llama"), hidden=64, ffn=192)


QUANTIZED_IDS = ["torchao", "quanto", "bitsandbytes-8bit", "bitsandbytes-4bit"]


@pytest.mark.parametrize("method, package, quantization, classes", QUANTIZED, ids=QUANTIZED_IDS)
def test_quantized_ffn_projections_measured_on_their_real_outputs(request, method, package, quantization, classes):
    pytest.importorskip(package)
    llama_dir = request.getfixturevalue("wide_llama_dir" if quantization.get("load_in_4bit") else "llama_dir")
    config = ProbeConfig(str(llama_dir), quantization=quantization, device="cpu")
    loaded, adapter, sites = load_checkpoint(config)
    model = loaded.model
    assert [site.site for site in sites] == [f"ffn.{i}" for i in range(N_LAYERS)]
    assert loaded.provenance["quantization"]["method"] == method
    assert loaded.provenance["quantization"]["ffn_modules"] == [classes]
    batches = _batches(model.config.vocab_size)
    got = probe_model(model, batches, adapter=adapter, flow=False).rows
    assert_rows_equal(got, _own_rows(model, batches), **ROUND_OFF)
    unquantized = probe_model(_load(llama_dir), batches, flow=False).rows
    drift = max(abs(a["pr_pre"] - b["pr_pre"]) / b["pr_pre"] for a, b in zip(got, unquantized))
    assert drift > 1e-5  # the int8 weights' outputs were measured, not float ones


def test_checkpoint_saved_quantized_probed_by_the_command(llama_dir, tmp_path):
    pytest.importorskip("torchao")
    loaded, _, _ = load_checkpoint(ProbeConfig(str(llama_dir), quantization=INT8, device="cpu"))
    assert type(loaded.model.model.layers[1].mlp.down_proj.weight).__name__ == "Int8Tensor"
    # a checkpoint saved quantized: nerve probe reads its method from config.json and says so
    saved = tmp_path / "int8"
    loaded.model.save_pretrained(saved)
    loaded.tokenizer.save_pretrained(saved)
    out = tmp_path / "out"
    args = ["--text-file", str(llama_dir / "corpus.txt"), "--seq-len", "16", "--max-tokens", "200", "--no-flow"]
    assert main(["probe", str(saved), *args, "--device", "cpu", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["quantization"]["method"] == "torchao"
    assert report["model"]["quantization"]["config"]["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"
    assert report["model"]["quantization"]["ffn_modules"] == ["Linear(weight=Int8Tensor)"]
    assert [row["tokens"] for row in report["rows"]] == [200] * N_LAYERS


def test_quantization_backends_in_a_child_process(request):
    """torchao's and bitsandbytes' cases above (4 tests), where their packages import (tests/isolated_packages.py)."""
    selection = [__file__, "-k", "quantized_ffn_projections and (torchao or bitsandbytes) or saved_quantized"]
    run_in_child(request, ("torchao", "bitsandbytes"), selection, tests=4)


# ------------------------------------------------------------------------------ the memory plan
def _state_tensors(tracker) -> dict[str, int]:
    """Bytes of the float64 tensors the tracker's accumulators hold, per device (each storage once)."""
    seen, out = set(), {}
    measurements = tracker.window().measurements
    for index in range(len(tracker.sites)):
        for acc in measurements.accumulators(index).values():
            for value in vars(acc).values():
                for tensor in value if isinstance(value, tuple) else (value,):
                    if torch.is_tensor(tensor) and tensor.dtype == torch.float64 and tensor.data_ptr() not in seen:
                        seen.add(tensor.data_ptr())
                        out[str(tensor.device)] = out.get(str(tensor.device), 0) + tensor.nbytes
    return out


@pytest.mark.parametrize("flow", [False, True])
def test_memory_plan_against_what_was_allocated(llama_dir, tmp_path, flow):
    from safetensors import safe_open

    model = _load(llama_dir, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"))
    tracker = FFNTracker(model, flow=flow, state_device="cpu")
    plan = plan_memory(model, tracker)
    with torch.no_grad(), tracker:
        for batch in _batches(model.config.vocab_size):
            model(**batch)
    allocated = _state_tensors(tracker)
    assert allocated == {"cpu": plan.device("cpu").state_bytes}
    per_ffn = 2 * (37 * 37 + 37) * 8 + (2 * (24 * 24 + 24) * 8 if flow else 0)
    assert plan.device("cpu").state_bytes == N_LAYERS * per_ffn and plan.device("cpu").sites == N_LAYERS

    # the model's share: resident tensors' storage on the CPU, the checkpoint's tensors of disk-mapped blocks
    resident = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu"}
    assert plan.device("cpu").model_bytes == sum(resident.values())
    disk = [p for p, d in DEVICE_MAP.items() if d == "disk"]
    with safe_open(str(llama_dir / "model.safetensors"), "pt") as stored:
        on_disk = sum(stored.get_tensor(k).nbytes for k in stored.keys() if any(k.startswith(p + ".") for p in disk))
    assert plan.device("disk").model_bytes == on_disk > 0 and plan.device("disk").state_bytes == 0

    # eigendecomposition: each CPU worker holds one covariance and LAPACK's copy of the widest
    matrices = N_LAYERS * (4 if flow else 2)
    assert plan.device("cpu").eigen_peak_bytes == min(torch.get_num_threads(), matrices) * 2 * 37 * 37 * 8


def test_memory_plan_refuses_before_any_forward_when_a_device_is_short(llama_dir, monkeypatch):
    from nerve_hf.probe import memory_plan

    model = _load(llama_dir)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    # 3 FFNs: 3 x 22,496 B of state and at least one covariance + LAPACK copy (21,904 B): over 70 kB;
    # one FFN: 22,496 B and at most 2 x 21,904 B of eigendecomposition: under
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: 70_000)
    with pytest.raises(MemoryPlanError, match=r"cpu needs 0\.064 MiB of covariance state for 3 FFNs") as error:
        probe_model(model, _batches(model.config.vocab_size), flow=False)
    assert "--layers" in str(error.value) and "--state-device cpu" in str(error.value) and not calls
    rows = probe_model(model, _batches(model.config.vocab_size), layers=[0], flow=False).rows
    assert [row["tokens"] for row in rows] == [2 * (3 * 11 - 4)] and calls


class QuantLinear(torch.nn.Module):
    """A GPTQ-style packed layer that is not an ``nn.Linear``: int8 weight and per-row scale as buffers,
    sizes as ``infeatures``/``outfeatures`` (auto-gptq's names)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.infeatures, self.outfeatures = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True) / 127  # [out, 1]
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))  # [out, in]
        self.register_buffer("scales", scale)

    def forward(self, x):
        return x @ (self.qweight.to(x.dtype) * self.scales).T  # [..., out]


def test_quantized_linear_layers_outside_nn_linear_are_sites_with_their_widths(llama_dir):
    import model_adapters

    model = _load(llama_dir)
    for block in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(block.mlp, name, QuantLinear(getattr(block.mlp, name)))
    assert model_adapters.linear_dims(model.model.layers[0].mlp.gate_proj) == (24, 37)
    assert model_adapters.find_ffn(model.model.layers[0].mlp) == ("gate_proj", "down_proj", True)
    tracker = FFNTracker(model, flow=False)
    assert plan_memory(model, tracker).unknown_widths == []  # widths known before any forward
    batches = _batches(model.config.vocab_size)
    got = probe_model(model, batches, flow=False).rows
    assert_rows_equal(got, _own_rows(model, batches), **ROUND_OFF)


# ------------------------------------------------------------- GPU and CPU (benchmarks/perf/run_gpu.sh)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_device_map_over_gpu_and_cpu(llama_dir, tmp_path):
    """device_map="auto" with room for part of the model on the GPU: the rest is kept on the CPU and run on
    the GPU (accelerate's CPU offload); rows equal those of the whole model on the GPU and own hooks."""
    layer_bytes = sum(t.nbytes for t in _load(llama_dir).model.layers[0].parameters())
    placed = _load(llama_dir, device_map="auto", max_memory={0: 3 * layer_bytes, "cpu": "1GiB"})
    assert 0 in placed.hf_device_map.values() and "cpu" in placed.hf_device_map.values(), placed.hf_device_map
    whole = _load(llama_dir).to("cuda")
    batches = _batches(whole.config.vocab_size)
    tracker = FFNTracker(placed, flow=False)
    plan = plan_memory(placed, tracker)
    got = probe_model(placed, batches, flow=False).rows
    assert_rows_equal(got, probe_model(whole, batches, flow=False).rows, **ROUND_OFF)
    assert_rows_equal(got, _own_rows(placed, batches), **ROUND_OFF)
    assert plan.device("cuda:0").sites == N_LAYERS  # CPU-kept layers run, and are measured, on the GPU
    assert plan.device("cuda:0").state_bytes == N_LAYERS * 2 * (37 * 37 + 37) * 8
    assert plan.device("cpu").model_bytes > 0 and plan.device("cuda:0").model_bytes > 0
    with torch.no_grad(), tracker:
        for batch in batches:
            placed(**{k: v.to("cuda") for k, v in batch.items()})
    assert _state_tensors(tracker) == {"cuda:0": plan.device("cuda:0").state_bytes}


# ------------------------------------------------------------------------------ quantized fused experts
@pytest.mark.parametrize("quantized", ["float8 weights with scales", "int8 weights"])
def test_quantized_fused_experts_refused_by_class_and_dtype(quantized):
    """Routed experts are recomputed from the fused experts module's weights: weights stored as FP8 with
    their inverse scales (transformers' FP8Experts keeps ``gate_up_proj`` float8 and ``gate_up_proj_scale_inv``)
    or as integers cannot be, so the tracker refuses them by name instead of measuring garbage."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    model = MixtralForCausalLM(config)
    FFNTracker(model, flow=False).detach()  # float experts are measured
    experts = model.model.layers[1].mlp.experts
    weight = experts.gate_up_proj.detach()
    if quantized == "int8 weights":
        experts.gate_up_proj = torch.nn.Parameter(weight.to(torch.int8), requires_grad=False)
        match = r"MixtralExperts holds quantized weights \(int8\)"
    else:
        experts.gate_up_proj = torch.nn.Parameter(weight.to(torch.float8_e4m3fn), requires_grad=False)
        experts.gate_up_proj_scale_inv = torch.nn.Parameter(torch.ones(4, 1, 1), requires_grad=False)
        match = r"MixtralExperts holds quantized weights \(float8_e4m3fn, with gate_up_proj_scale_inv\)"
    with pytest.raises(ValueError, match=match):
        FFNTracker(model, flow=False)
    FFNTracker(model, flow=False, layers=[0]).detach()  # the layers without them still are
