"""BERT-style encoders: the FFN is split over ``intermediate`` (up + act) and ``output`` (down)."""

from .spec import ffn

_ENCODER = ffn("encoder.layer", pre="intermediate.dense", post="output.dense")

# config.model_type -> Adapter
ADAPTERS = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
}
