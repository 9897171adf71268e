"""NerveCallback on evaluation models loaded with a device map (#31): blocks kept on the CPU or offloaded to
disk (accelerate's hooks move their weights in for the forward), handed to a Trainer for ``evaluate``. The
callback never moves the model, each FFN's statistics live where its layer runs, and the logged metrics
equal those of the same model loaded whole and those of my own float64 hooks on the real tokens."""

import warnings

import numpy as np
import pytest
import torch
from reference import activation_metrics

from nerve_hf import NerveCallback, NerveConfig
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.probe import memory_plan
from nerve_hf.probe.memory_plan import MemoryPlanError

N_LAYERS = 3
VOCAB = 41
# the embedding and two blocks on disk (meta until their forward), the rest resident on the CPU
DEVICE_MAP = {
    "model.embed_tokens": "disk",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "disk",
    "lm_head": "cpu",
}
ROUND_OFF = dict(rel=1e-5, abs=1e-7)  # float32 activations, float64 statistics


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load(path, **kwargs):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def _dataset():
    """7 sequences of 11 tokens; every third one padded on the right after 6 tokens (label -100 there)."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (7, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0
    ids[mask == 0] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def _evaluate(model, out, late=False, **config):
    """``Trainer.evaluate`` with a NerveCallback (given to the Trainer, or ``late``: added after it was built,
    so the callback is set up during the evaluation and re-runs its first batch); its eval metrics."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(out), per_device_eval_batch_size=3, report_to=[], use_cpu=True)
    callback = NerveCallback(NerveConfig(flow=False, **config))
    trainer = Trainer(model=model, args=args, eval_dataset=_dataset(), callbacks=[] if late else [callback])
    if late:
        trainer.add_callback(callback)
    return trainer.evaluate(), trainer


def _rows(metrics) -> list[dict]:
    return [{name: metrics[f"eval_nerve/ffn.{i}/{name}"] for name in METRIC_NAMES} for i in range(N_LAYERS)]


def _assert_close(got, want):
    for layer, (row, ref) in enumerate(zip(got, want)):
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(ref[name], **ROUND_OFF), (layer, name)


class OwnHooks:
    """My own capture: float64 gate_proj outputs (pre) and down_proj inputs (post) of every layer, over the
    real tokens of each forward (the attention mask the call was given)."""

    def __init__(self, model):
        self.seen = [{"pre": [], "post": []} for _ in range(N_LAYERS)]
        self.mask = None
        self.handles = [model.register_forward_pre_hook(self._call, with_kwargs=True)]
        for layer, block in enumerate(model.model.layers):
            stage = self.seen[layer]
            self.handles.append(
                block.mlp.gate_proj.register_forward_hook(lambda m, a, o, s=stage: self._keep(s, "pre", o))
            )
            self.handles.append(
                block.mlp.down_proj.register_forward_pre_hook(lambda m, a, s=stage: self._keep(s, "post", a[0]))
            )

    def _call(self, module, args, kwargs):
        self.mask = kwargs["attention_mask"].reshape(-1).bool().cpu()

    def _keep(self, stage, side, x):
        stage[side].append(x.detach().reshape(-1, x.shape[-1]).double().cpu().numpy()[self.mask.numpy()])

    def rows(self) -> list[dict]:
        for handle in self.handles:
            handle.remove()
        return [activation_metrics(np.concatenate(s["pre"]), np.concatenate(s["post"])) for s in self.seen]


@pytest.fixture(scope="module")
def whole_rows(llama_dir, tmp_path_factory):
    metrics, _ = _evaluate(_load(llama_dir), tmp_path_factory.mktemp("whole"))
    return _rows(metrics)


@pytest.mark.parametrize("placement", ["cpu+disk map", "auto, small max_memory"])
def test_device_mapped_eval_model_measured_like_the_whole_model(llama_dir, tmp_path, whole_rows, placement):
    if placement == "cpu+disk map":
        kwargs = dict(device_map=DEVICE_MAP)
    else:
        kwargs = dict(device_map="auto", max_memory={"cpu": "40KB"})
    model = _load(llama_dir, offload_folder=str(tmp_path / "offload"), **kwargs)
    placed = dict(model.hf_device_map)
    assert {"cpu", "disk"} <= set(placed.values())
    own = OwnHooks(model)
    metrics, trainer = _evaluate(model, tmp_path / "out")
    got = _rows(metrics)
    _assert_close(got, whole_rows)
    _assert_close(got, own.rows())
    # never moved: the map is the same, disk-mapped weights stay on meta until their forward
    assert model.hf_device_map == placed
    on_disk = [name for name, device in placed.items() if device == "disk" and name.startswith("model.layers")]
    assert on_disk and all(model.get_submodule(n).mlp.up_proj.weight.device.type == "meta" for n in on_disk[:1])
    # each FFN's statistics were kept on the device its layer runs on (the CPU: no accelerator in the map)
    assert plan_devices(trainer) == {"cpu": N_LAYERS}


def plan_devices(trainer) -> dict[str, int]:
    """Sites per device in the memory plan of the callback's tracker."""
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, NerveCallback))
    plan = memory_plan.plan_memory(trainer.model, callback._tracking.tracker)
    return {p.device: p.sites for p in plan.devices if p.sites}


def test_callback_set_up_during_the_evaluation_sends_its_rerun_to_the_first_module(llama_dir, tmp_path, whole_rows):
    """Added after the Trainer was built, the callback re-runs the evaluation's first batch: to where the
    embedding runs (the CPU), not to its first parameter's device (meta: it is on disk)."""
    model = _load(llama_dir, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"))
    assert next(model.parameters()).device.type == "meta"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics, _ = _evaluate(model, tmp_path / "out", late=True)
    assert not [w for w in caught if "NerveCallback" in str(w.message)], [str(w.message) for w in caught]
    _assert_close(_rows(metrics), whole_rows)


def test_per_device_plan_refused_when_the_trainer_is_built_and_warned_later(llama_dir, tmp_path, monkeypatch):
    """A device-mapped model whose per-device state and eigendecomposition do not fit in a device's free
    memory: refused while the Trainer is built (like memory_budget_mb), a warning and no metrics when the
    callback is added later."""
    model = _load(llama_dir, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"))
    # 3 FFNs of width 37: 3 x 22,496 B of state and at least 21,904 B of eigendecomposition, over 70 kB
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: 70_000)
    with pytest.raises(MemoryPlanError, match=r"cpu needs 0\.064 MiB of covariance state for 3 FFNs") as error:
        _evaluate(model, tmp_path / "refused")
    # the remedies are named as the callback's keywords, not the probe's flags
    assert "state_device='cpu'" in str(error.value) and "--" not in str(error.value)
    with pytest.warns(RuntimeWarning, match="NerveCallback is disabled: NerveCallback does not fit: cpu needs"):
        metrics, _ = _evaluate(model, tmp_path / "late", late=True)
    assert not [key for key in metrics if "nerve" in key]
    # one layer fits
    metrics, _ = _evaluate(model, tmp_path / "one", layers=[1])
    assert np.isfinite(metrics["eval_nerve/ffn.1/pr_pre"]) and "eval_nerve/ffn.0/pr_pre" not in metrics
