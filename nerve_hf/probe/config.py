"""``nerve probe``'s options: :class:`ProbeConfig`, whose fields are the command's flags, and their checks.

>>> config = ProbeConfig("gpt2", layers=[0, -1], flow=False)
>>> config.max_tokens, config.layers, config.flow
(16384, [0, -1], False)
>>> ProbeConfig("gpt2", seq_len=0)
Traceback (most recent call last):
...
nerve_hf.options.OptionValueError: --seq-len must be a positive integer, got 0
"""

from __future__ import annotations

from dataclasses import KW_ONLY, MISSING, dataclass
from typing import Optional

from nerve_hf.data import EMBEDDED_CORPORA, TEXT_COLUMNS
from nerve_hf.errors import InputError
from nerve_hf.measurement_options import MEASUREMENT, MeasurementOptions
from nerve_hf.options import (
    OptionTypeError,
    OptionValueError,
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
from nerve_hf.probe.models import DTYPES
from nerve_hf.probe.placement import DEVICE_MAP_STRATEGIES, device_map_option, max_memory_option, quantization_option

__all__ = ["ProbeConfig", "TEXT_INPUT", "IMAGE_INPUT", "PLACEMENT", "MEASUREMENT", "text_list"]


def text_list(name: str, value) -> list[str]:
    """A non-empty list of non-empty strings; one string stands for a list of one (``revision="main"``)."""
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


# Argument groups of ``nerve probe --help`` (the ``group`` of a field's metadata); MEASUREMENT is the group of
# the shared measurement options.
TEXT_INPUT, IMAGE_INPUT, PLACEMENT = "text input", "image input", "model placement"


@dataclass
class ProbeConfig(MeasurementOptions):
    """Everything ``nerve probe`` needs: what is measured (:class:`~nerve_hf.measurement_options.MeasurementOptions`,
    shared with the Trainer callback), the model and its inputs. The command's flags are made from these fields
    (``--<field-with-dashes>``; help, ``group`` and ``metavar`` from the metadata) and every error names the flag."""

    option_name = staticmethod(_flag)

    model: str = option(
        MISSING,
        "local model folder (transformers save_pretrained or timm), a Hugging Face Hub id, timm/<name> "
        "for a timm Hub model, or a timm checkpoint file/folder with --timm-arch",
        text,
        metavar="MODEL",
    )
    _: KW_ONLY  # the other options are keywords, like the inherited ones
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
    # The command reads its input up to max_tokens, so its cap is a number (None would read a streamed
    # dataset without end): this field replaces MeasurementOptions.max_tokens.
    max_tokens: int = option(
        16384,
        "per FFN, measure at most this many tokens (rows); the input is cut to it",
        token_cap,
        group=MEASUREMENT,
    )
    batch_size: int = option(8, "sequences or images per forward pass", positive_int, group=MEASUREMENT)
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
    # ---------------------------------------------------------------------------- model placement
    device_map: Optional[str] = option(
        None,
        f"place the weights as accelerate's big-model inference does (transformers checkpoints): "
        f"{', '.join(DEVICE_MAP_STRATEGIES)}, one device, or a JSON object of module name -> device "
        f"(GPU index, 'cpu', 'disk'); the model is never moved, inputs go to its first module's device",
        optional(device_map_option),
        group=PLACEMENT,
        metavar="MAP",
    )
    max_memory: Optional[str] = option(
        None,
        "memory per device for the weights with --device-map, e.g. 0:70GiB,cpu:200GiB (what does not fit "
        "goes to the next device, then to --offload-folder)",
        optional(max_memory_option),
        group=PLACEMENT,
        metavar="DEV:SIZE,...",
    )
    offload_folder: Optional[str] = option(
        None, "folder for the weights offloaded to disk by --device-map", optional(text), group=PLACEMENT, metavar="DIR"
    )
    quantization: Optional[dict] = option(
        None,
        "quantize the weights while loading: a transformers quantization config as a JSON object, e.g. "
        '\'{"quant_method": "bitsandbytes_4bit", "load_in_4bit": true}\' (a pre-quantized checkpoint needs none)',
        optional(quantization_option),
        group=PLACEMENT,
        metavar="JSON",
    )
    state_device: Optional[str] = option(
        None,
        "where the float64 covariance state lives ('cpu': host memory); default: each FFN's own device",
        optional(text),
        group=PLACEMENT,
        metavar="DEVICE",
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # the measurement options' own cross-field checks
        if self.text_file is not None and self.dataset is not None:
            raise InputError("give --text-file or --dataset, not both")
        if self.device_map is not None and self.device is not None:
            raise InputError("give --device or --device-map, not both: a device-mapped model is never moved")
        for name in ("max_memory", "offload_folder"):
            if getattr(self, name) is not None and self.device_map is None:
                raise InputError(f"--{name.replace('_', '-')} places weights with --device-map: give --device-map too")
