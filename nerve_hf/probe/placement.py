"""Where a probed model lives: device maps, memory limits, disk offload and quantized weights.

The loading options (checked where they are given, :class:`Placement` passes them to ``from_pretrained``
as a user of accelerate's big-model inference would) and what is read off a loaded model: whether it was
dispatched (:func:`is_dispatched`: never move it), the device its inputs go to (:func:`input_device`), the
device each module runs on (:func:`execution_devices`, :func:`device_of`; these four live in
:mod:`nerve_hf.tracking.devices`, shared with the Trainer's callback) and how its weights were quantized
(:func:`quantization_of`).

>>> device_map_option("device_map", '{"model.layers.0": "cpu", "model.layers.1": "disk"}')
{'model.layers.0': 'cpu', 'model.layers.1': 'disk'}
>>> max_memory_option("max_memory", "0:70GiB, cpu:200GiB")
{0: '70GiB', 'cpu': '200GiB'}
>>> quantization_option("quantization", {"quant_method": "mxfp4"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
nerve_hf.options.OptionValueError: quantization must be ...; quant_method 'mxfp4' is refused: fused expert ...
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from nerve_hf.errors import InputError, first_line
from nerve_hf.options import OptionTypeError, OptionValueError
from nerve_hf.tracking.devices import device_of, execution_devices, input_device, is_dispatched

__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "READABLE_METHODS",
    "REFUSED_METHODS",
    "Placement",
    "device_map_option",
    "max_memory_option",
    "quantization_option",
    "check_quant_method",
    "is_dispatched",
    "input_device",
    "execution_devices",
    "device_of",
    "quantization_of",
]

# accelerate's strategies for device_map (a dict, or one device name, places modules by hand)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# transformers quantization methods whose FFN projections stay one module each, called on the FFN's input
# and returning its output (Linear subclasses, or Linear-like modules with in/out features): the adapters
# find them under their usual names and the hooks read their real outputs. As loaded by transformers 5.25:
# bitsandbytes Linear8bitLt/Linear4bit, quanto QLinear, torchao Linear(weight=<quantized tensor>), fp8 FP8Linear,
# fbgemm_fp8 FbgemmFp8Linear, compressed-tensors CompressedLinear (nn.Linear subclasses); gptq/awq gptqmodel's
# *QuantLinear (in_features/out_features); eetq EetqLinear, bitnet BitLinear, higgs HiggsLinear (Linear-like).
# Fused routed experts whose weights a method quantizes (fp8's FP8Experts, fbgemm's FP8 experts) cannot be
# recomputed: the tracker refuses them (tracking.experts_compute.ExpertsLayout.check_readable).
READABLE_METHODS = (
    "aqlm",
    "auto-round",
    "awq",
    "bitnet",
    "bitsandbytes",
    "bitsandbytes_4bit",
    "bitsandbytes_8bit",
    "compressed-tensors",
    "eetq",
    "fbgemm_fp8",
    "fouroversix",
    "fp8",
    "fp_quant",
    "gemma",
    "gguf",
    "gptq",
    "higgs",
    "hqq",
    "metal",
    "mxfp8",
    "nvfp4",
    "quanto",
    "quark",
    "sinq",
    "spqr",
    "torchao",
    "vptq",
)
# methods nerve_hf knows and refuses, and why
REFUSED_METHODS = {
    "mxfp4": "fused expert weights packed in 4-bit blocks: their widths and outputs are not those of the FFN's "
    "projections",
}
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)


def device_map_option(name: str, value: Any) -> str | dict:
    """A device map as ``from_pretrained`` takes it: a strategy (:data:`DEVICE_MAP_STRATEGIES`), one device
    (``cpu``, ``cuda:0``), or a dict (a JSON object on the command line) from module names to devices
    (an int GPU index, ``cpu``, ``disk`` or a device name)."""
    requirement = (
        f"one of {', '.join(DEVICE_MAP_STRATEGIES)}, a device name, or a JSON object of module name -> device "
        f"(a GPU index, 'cpu', 'disk')"
    )
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise OptionValueError(name, requirement, value) from None
        elif text:
            return text
    if not isinstance(value, dict):
        raise OptionTypeError(name, requirement, value)
    for key, device in value.items():
        if not isinstance(key, str) or not (isinstance(device, (str, int)) and not isinstance(device, bool)):
            raise OptionValueError(name, requirement, value)
    return dict(value)


def max_memory_option(name: str, value: Any) -> dict:
    """Memory per device for the weights, as accelerate reads it: ``{0: "70GiB", "cpu": "200GiB"}``, or the
    command line's ``0:70GiB,cpu:200GiB``; a size is bytes (int) or a number with a unit (KB, MiB, GiB ...)."""
    requirement = "device:size pairs such as 0:70GiB,cpu:200GiB (GPU index or cpu/mps/xpu:N; size in bytes or units)"
    if isinstance(value, str):
        pairs = [part.strip() for part in value.split(",") if part.strip()]
        if not pairs or not all(":" in pair for pair in pairs):
            raise OptionValueError(name, requirement, value)
        value = dict(pair.rsplit(":", 1) for pair in pairs)
    if not isinstance(value, dict) or not value:
        raise OptionTypeError(name, requirement, value)
    out: dict = {}
    for key, size in value.items():
        key = key.strip() if isinstance(key, str) else key
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        size = size.strip() if isinstance(size, str) else size
        good_size = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
            isinstance(size, str) and _MEMORY.match(size)
        )
        if not (isinstance(key, (int, str)) and key != "" and good_size):
            raise OptionValueError(name, requirement, value)
        out[key] = size
    return out


def check_quant_method(method: str, where: str) -> None:
    """InputError naming ``method`` when nerve_hf cannot read FFNs quantized by it."""
    if method in READABLE_METHODS:
        return
    why = REFUSED_METHODS.get(method, "a quantization method nerve_hf does not know")
    raise InputError(
        f"{where}: quantization method {method!r} cannot be measured ({why}); nerve_hf reads "
        f"{', '.join(READABLE_METHODS)}"
    )


def quantization_option(name: str, value: Any) -> dict:
    """A transformers quantization config as a dict (a JSON object on the command line) whose
    ``quant_method`` nerve_hf reads, e.g. ``{"quant_method": "bitsandbytes_4bit", "load_in_4bit": true}``."""
    requirement = "a quantization config such as {'quant_method': 'bitsandbytes_8bit', 'load_in_8bit': True}"
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise OptionTypeError(name, requirement, value)
    method = value.get("quant_method")
    if not isinstance(method, str):
        raise OptionValueError(name, requirement + " (a string quant_method)", value)
    if method not in READABLE_METHODS:
        why = REFUSED_METHODS.get(method, "not a quantization method nerve_hf knows")
        readable = (
            f"a quantization config whose quant_method nerve_hf reads ({', '.join(READABLE_METHODS)}); "
            f"quant_method {method!r} is refused: {why}"
        )
        raise OptionValueError(name, readable, value)
    return dict(value)


@dataclass
class Placement:
    """How ``from_pretrained`` places and quantizes the weights (all None: whole, on the CPU, unquantized)."""

    device_map: Optional[str | dict] = None
    max_memory: Optional[dict] = None
    offload_folder: Optional[str] = None
    quantization: Optional[dict] = None
    device: Optional[str] = None  # where quantized weights go without a device map (they are never moved after)

    @property
    def dispatches(self) -> bool:
        """Whether loading places the model itself (then nothing may move it)."""
        return self.device_map is not None or self.quantization is not None

    def kwargs(self, prequantized: bool = False) -> dict:
        """The keyword arguments of ``from_pretrained`` (InputError for a quantization config it rejects);
        ``prequantized``: the checkpoint was saved quantized (it loads on ``device`` without a device map)."""
        out: dict = {}
        if self.device_map is not None:
            out["device_map"] = self.device_map
        elif (prequantized or self.quantization is not None) and self.device is not None:
            out["device_map"] = self.device
        if self.max_memory is not None:
            out["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            out["offload_folder"] = self.offload_folder
        if self.quantization is not None:
            from transformers.quantizers.auto import AutoQuantizationConfig

            try:
                out["quantization_config"] = AutoQuantizationConfig.from_dict(dict(self.quantization))
            except Exception as error:  # noqa: BLE001 - ValueError, TypeError, ImportError of the backend
                raise InputError(f"--quantization {self.quantization!r}: {first_line(error)}") from None
        return out


# ----------------------------------------------------------------------------- the loaded model
def quantization_of(model) -> Optional[dict]:
    """``{"method", "config"}`` of a model quantized by transformers (its ``quantization_config``), else None."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None or not getattr(model, "is_quantized", True):
        return None
    as_dict = config if isinstance(config, dict) else config.to_dict()
    method = as_dict.get("quant_method")
    method = getattr(method, "value", method)
    return {"method": str(method), "config": json.loads(json.dumps(as_dict, default=str))}
