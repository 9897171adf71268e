"""Loading a model for ``nerve probe``: transformers checkpoints (Auto classes) and timm models.

MODEL is resolved in this order:

1. ``--timm-arch NAME`` given: MODEL is a local timm checkpoint (a weights file, or a folder holding
   ``model.safetensors`` / ``pytorch_model.bin``) for ``timm.create_model(NAME, **timm_kwargs)``.
2. ``timm/...`` or ``hf-hub:...``: a timm model on the Hub, ``timm.create_model("hf-hub:...", pretrained=True)``.
3. A local folder with ``config.json``: timm's format (``architecture`` key) loads with
   ``timm.create_model("local-dir:...")``; transformers' format (``model_type`` key) with the Auto classes.
4. Anything else that looks like a Hub id (``gpt2``, ``org/name``): transformers from the Hub.

:func:`classify` does steps 1-4 without importing torch, so bad input fails fast.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from nerve_hf.errors import InputError, first_line, requires
from nerve_hf.probe.placement import Placement, check_quant_method, quantization_of

__all__ = ["ModelSource", "LoadedModel", "classify", "load_model", "default_device", "check_device", "DTYPES"]

# --dtype choices: torch dtype names ("auto": whatever the checkpoint holds)
DTYPES = ("float32", "float16", "bfloat16", "auto")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)?$")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth", "pytorch_model.pth")


@dataclass
class ModelSource:
    """Where MODEL lives and which library loads it."""

    spec: str  # what the user typed
    library: str  # "transformers" | "timm"
    location: str  # "local" | "hub"
    path: Path | None = None  # local file or folder

    @property
    def modality(self) -> str:
        return "image" if self.library == "timm" else "text"


def classify(spec: str, timm_arch: str | None = None) -> ModelSource:
    """Decide how MODEL loads (no heavy imports); InputError when it can be nothing."""
    path = Path(spec).expanduser()
    if timm_arch is not None:
        if not path.exists():
            raise InputError(
                f"--timm-arch needs MODEL to be a local checkpoint file or folder; {spec!r} does not exist"
            )
        return ModelSource(spec, "timm", "local", path)
    if spec.startswith(("timm/", "hf-hub:")) and not path.exists():
        return ModelSource(spec, "timm", "hub")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise InputError(
                f"{spec!r} is a folder without config.json: not a transformers or timm model "
                f"(for a bare timm checkpoint pass --timm-arch NAME)"
            )
        try:
            keys = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{str(config)!r} is not a readable JSON config: {first_line(error)}") from None
        if isinstance(keys, dict) and "architecture" in keys and "model_type" not in keys:
            return ModelSource(spec, "timm", "local", path)
        return ModelSource(spec, "transformers", "local", path)
    if path.exists():
        raise InputError(
            f"{spec!r} is a file; a transformers model is a folder, a timm checkpoint file needs --timm-arch NAME"
        )
    if _HUB_ID.match(spec) and ".." not in spec and "--" not in spec:
        return ModelSource(spec, "transformers", "hub")
    raise InputError(f"{spec!r} is neither a local model folder nor a Hugging Face Hub id")


@dataclass
class LoadedModel:
    """A model ready to probe, with what is needed to feed it and where it came from."""

    model: object  # torch.nn.Module
    source: ModelSource
    tokenizer: object | None = None  # text models
    data_config: dict | None = None  # image models: timm's input_size (C, H, W), mean, std, ...
    max_length: int | None = None  # longest sequence the model accepts (text models)
    provenance: dict = field(default_factory=dict)
    memory_plan: dict | None = None  # the probe's memory plan (MemoryPlan.to_dict), once made


def _torch_dtype(name: str):
    """The torch dtype of a :data:`DTYPES` name (checked by ``ProbeConfig``); None for ``auto``."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def _placement_provenance(model) -> dict:
    """Where the weights were placed (the device map, JSON-safe) and how they were quantized (None: not)."""
    device_map = getattr(model, "hf_device_map", None)
    return {
        "device_map": {name: str(device) for name, device in device_map.items()} if device_map else None,
        "quantization": quantization_of(model),
    }


def _load_transformers(
    source: ModelSource,
    tokenizer_spec: str | None,
    dtype: str,
    revision: str | None,
    trust_remote_code: bool,
    placement: Placement,
) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    where = "from the Hugging Face Hub" if source.location == "hub" else "from its folder"
    if revision is not None:
        where = f"at revision {revision!r} {where}"
    options = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source.spec, **options)
    except Exception as error:  # noqa: BLE001 - OSError, ValueError, KeyError, HTTP errors ...
        raise InputError(f"cannot load the config of {source.spec!r} {where}: {first_line(error)}") from None
    quantized = getattr(config, "quantization_config", None)  # a pre-quantized checkpoint
    if quantized is not None:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized.quant_method
        check_quant_method(str(getattr(method, "value", method)), f"{source.spec!r} was quantized")
    architectures = list(getattr(config, "architectures", None) or [])
    causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
    auto = AutoModelForCausalLM if causal else AutoModel
    torch_dtype = _torch_dtype(dtype)
    placed = placement.kwargs(quantized is not None)  # device_map, max_memory, offload_folder, quantization_config
    loading = dict(dtype="auto" if torch_dtype is None else torch_dtype, **options, **placed)
    try:
        model, info = auto.from_pretrained(source.spec, output_loading_info=True, **loading)
    except Exception as error:  # noqa: BLE001
        reason = _mismatched_weights(auto, source.spec, loading) or first_line(error)
        raise InputError(f"cannot load model {source.spec!r} {where}: {reason}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers initialised them at random and only logs it: measuring them would invent numbers
        raise InputError(
            f"cannot load model {source.spec!r} {where}: the weights lack {len(missing)} "
            f"{'parameter' if len(missing) == 1 else 'parameters'} the config needs ({_listed(missing)}); "
            "they would be measured at their random initialisation"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_spec or source.spec, **options)
    except Exception as error:  # noqa: BLE001
        raise InputError(
            f"cannot load a tokenizer from {tokenizer_spec or source.spec!r}: {first_line(error)} (pass --tokenizer)"
        ) from None

    limits = [getattr(config, key, None) for key in ("n_positions", "max_position_embeddings")]
    limits.append(tokenizer.model_max_length if tokenizer.model_max_length < 10**7 else None)
    limits = [int(v) for v in limits if isinstance(v, int) and v > 0]
    provenance = {
        "name": source.spec,
        "library": "transformers",
        "location": source.location,
        "path": str(source.path.resolve()) if source.path else None,
        "class": type(model).__name__,
        "auto_class": auto.__name__,
        "model_type": getattr(config, "model_type", None),
        "revision": revision,
        "commit": getattr(config, "_commit_hash", None),
        "tokenizer": tokenizer_spec or source.spec,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **_placement_provenance(model),
    }
    return LoadedModel(
        model, source, tokenizer=tokenizer, max_length=min(limits) if limits else None, provenance=provenance
    )


def _read_state_dict(path: Path) -> dict:
    import torch

    if path.is_dir():
        found = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise InputError(f"{str(path)!r} holds no weights file ({', '.join(_WEIGHT_FILES)})")
        path = found[0]
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle, zip, safetensors header errors
        raise InputError(f"cannot read weights from {str(path)!r}: {first_line(error)}") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise InputError(f"{str(path)!r} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _timm_constructor(arch: str):
    """``timm.create_model(arch)`` for a registry name; the class itself for a class path such as
    ``timm.models.mlp_mixer.MlpMixer`` (a model of custom sizes, given by --timm-kwargs)."""
    import importlib

    with requires("probe"):
        import timm
    from torch import nn

    if timm.is_model(arch):
        return lambda **kwargs: timm.create_model(arch, pretrained=False, **kwargs)
    module_name, _, class_name = arch.replace(":", ".").rpartition(".")
    if module_name:
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            cls = None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    raise InputError(
        f"--timm-arch {arch!r} is neither a timm architecture (see timm.list_models()) nor a model class "
        f"path such as timm.models.mlp_mixer.MlpMixer"
    )


def _data_config(model, config: dict) -> dict:
    """timm's data config with input_size read off the patch embedding where there is one: a model built
    from a class (or with img_size/in_chans overrides) has no pretrained config that knows its size."""
    for name in ("patch_embed", "stem"):
        embed = getattr(model, name, None)
        img_size = getattr(embed, "img_size", None)
        proj = getattr(embed, "proj", None)
        if img_size is not None and hasattr(proj, "in_channels"):
            height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            channels = int(proj.in_channels)
            config = dict(config, input_size=(channels, int(height), int(width)))
            if len(config.get("mean", ())) != channels:  # e.g. grey models: one mean/std per channel
                config.update(
                    mean=(sum(config["mean"]) / len(config["mean"]),) * channels,
                    std=(sum(config["std"]) / len(config["std"]),) * channels,
                )
            break
    return config


def _mismatched_weights(auto, spec: str, loading: dict) -> str | None:
    """Why ``auto.from_pretrained(spec, **loading)`` refused the weights, when their shapes do not match the
    config: transformers raises "For details look at the above report!" and logs that report, which a
    one-line error would lose. A second load with ``ignore_mismatched_sizes=True`` and
    ``output_loading_info=True`` (only on this failing path) gives its ``mismatched_keys``
    (name, checkpoint shape, model shape); None when that finds none, or cannot load either."""
    try:
        _, info = auto.from_pretrained(spec, ignore_mismatched_sizes=True, output_loading_info=True, **loading)
    except Exception:  # noqa: BLE001 - the first error is reported instead
        return None
    mismatched = sorted(info.get("mismatched_keys") or ())
    if not mismatched:
        return None
    listed = _listed([f"{name}: checkpoint {tuple(ckpt)}, config {tuple(model)}" for name, ckpt, model in mismatched])
    noun = "parameter" if len(mismatched) == 1 else "parameters"
    return (
        f"the weights do not match the config: {len(mismatched)} {noun} of another shape ({listed}); "
        f"was config.json edited, or saved with other weights?"
    )


def _listed(items: list[str], shown: int = 4) -> str:
    """The first ``shown`` of ``items``, then how many more.

    >>> _listed(["a", "b", "c"], shown=2)
    'a; b; and 1 more'
    """
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def _load_timm(source: ModelSource, timm_arch: str | None, timm_kwargs: dict | None, dtype: str) -> LoadedModel:
    with requires("probe"):
        import timm
        from timm.data import resolve_model_data_config

    kwargs = dict(timm_kwargs or {})
    try:
        if timm_arch is not None:
            build = _timm_constructor(timm_arch)
            state = _read_state_dict(source.path)
            head = state.get("head.weight")
            if head is not None and "num_classes" not in kwargs:
                kwargs["num_classes"] = int(head.shape[0])  # a fine-tuned head of another size
            model = build(**kwargs)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise InputError(
                    f"weights in {source.spec!r} do not fit {timm_arch!r}"
                    f"{' with ' + json.dumps(kwargs) if kwargs else ''}: {len(missing)} missing (e.g. {missing[:1]}), "
                    f"{len(unexpected)} unexpected (e.g. {unexpected[:1]}); "
                    f"check --timm-arch / --timm-kwargs"
                )
        elif source.location == "local":
            model = timm.create_model(f"local-dir:{source.path}", pretrained=True, **kwargs)
        else:
            name = source.spec if source.spec.startswith("hf-hub:") else f"hf-hub:{source.spec}"
            model = timm.create_model(name, pretrained=True, **kwargs)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - RuntimeError, OSError, HTTP errors ...
        raise InputError(f"cannot load timm model {source.spec!r}: {first_line(error)}") from None
    torch_dtype = _torch_dtype(dtype)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model.eval()  # a freshly built timm model is in train mode; a loaded checkpoint is probed in eval mode
    data_config = _data_config(model, resolve_model_data_config(model))
    provenance = {
        "name": source.spec,
        "library": "timm",
        "location": source.location,
        "path": str(source.path.resolve()) if source.path else None,
        "class": type(model).__name__,
        "architecture": timm_arch or getattr(model, "default_cfg", {}).get("architecture"),
        "timm_kwargs": kwargs or None,
        "input_size": list(data_config["input_size"]),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    return LoadedModel(model, source, data_config=data_config, provenance=provenance)


def load_model(
    source: ModelSource,
    *,
    tokenizer: str | None = None,
    timm_arch: str | None = None,
    timm_kwargs: dict | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    placement: Placement | None = None,
) -> LoadedModel:
    """Load what :func:`classify` found: on the CPU (the caller moves it), or where ``placement`` puts a
    transformers checkpoint (device map, offload, quantization: then nothing moves it). InputError on failure."""
    placement = placement or Placement()
    if source.library == "timm":
        if placement.dispatches:
            raise InputError(f"{source.spec!r} is a timm model: --device-map and --quantization are for transformers")
        return _load_timm(source, timm_arch, timm_kwargs, dtype)
    return _load_transformers(source, tokenizer, dtype, revision, trust_remote_code, placement)


def default_device() -> str:
    """``cuda`` when a GPU is present, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str) -> str:
    """``name`` if torch can use it; InputError otherwise."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"--device {name!r} is not a torch device: {first_line(error)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name!r}: CUDA is not available on this machine")
    return name
