"""BERT-style encoders: the FFN is split over ``intermediate`` (up + act) and ``output`` (down).

Every family below builds its layer as ``BertLayer`` does (``intermediate.dense`` -> activation ->
``output.dense``, in ``encoder.layer``); checked in each family's modeling file.
"""

from .spec import ffn

_ENCODER = ffn("encoder.layer", pre="intermediate.dense", post="output.dense")

# config.model_type -> Adapter
ADAPTERS = {
    key: _ENCODER
    for key in (
        "bert",
        "roberta",
        "big_bird",
        "camembert",
        "data2vec-text",
        "electra",
        "ernie",
        "megatron-bert",
        "rembert",
        "roc_bert",
        "roformer",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
    )
}
