"""Where a placed model runs: the devices read off a model dispatched by a device map (accelerate's big-model
inference, CPU and disk offload included) or quantized by transformers, shared by ``nerve probe`` and the
Trainer's callback so that neither moves such a model and both send inputs where its first module runs.

Modules mapped to ``cpu`` or ``disk`` run on the map's first accelerator (accelerate moves their weights in
for the forward), or on the CPU when the map has none.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["is_dispatched", "execution_devices", "device_of", "input_device"]


def _device(name) -> Any:
    import torch

    return torch.device(f"cuda:{name}" if isinstance(name, int) else name)


def _device_map(model) -> Optional[dict]:
    device_map = getattr(model, "hf_device_map", None)
    return dict(device_map) if isinstance(device_map, dict) and device_map else None


def is_dispatched(model) -> bool:
    """True for a model placed by a device map or quantized by transformers: moving it is not ours to do."""
    return (
        _device_map(model) is not None
        or bool(getattr(model, "is_quantized", False))
        or any(hasattr(module, "_hf_hook") for module in model.modules())
    )


def _main_device(device_map: dict):
    """Where accelerate runs modules mapped to ``cpu`` or ``disk``: the first other device, else the CPU."""
    others = [device for device in device_map.values() if device not in ("cpu", "disk")]
    return _device(others[0] if others else "cpu")


def execution_devices(model) -> dict[str, Any]:
    """Module name -> the device its forward runs on, for the device map's entries (``{}``: none)."""
    device_map = _device_map(model)
    if device_map is None:
        return {}
    main = _main_device(device_map)  # the CPU when no accelerator is in the map
    return {name: main if device in ("cpu", "disk") else _device(device) for name, device in device_map.items()}


def device_of(model, name: str, fallback):
    """The device module ``name`` runs on: its longest device-map prefix, else its first real parameter's."""
    devices = execution_devices(model)
    for prefix in sorted(devices, key=len, reverse=True):
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            return devices[prefix]
    module = model.get_submodule(name) if name else model
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return fallback


def input_device(model):
    """Where the inputs go: the device of the model's first module (its first device-map entry, else its
    first parameter that is not on ``meta``), the CPU for a model without any."""
    import torch

    devices = execution_devices(model)
    if devices:
        return next(iter(devices.values()))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")
