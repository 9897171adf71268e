"""FFNs whose activation is a function call in ``forward``, not a child module (detection cannot see it).

- Lfm2/Lfm3 ``feed_forward``: ``w2(silu(w1(x)) * w3(x))`` -> pre = ``w1`` output (the gate).
- RWKV ``feed_forward``: ``value(square(relu(key(x))))`` -> pre = ``key`` output; the receptance gate
  multiplies the FFN's output, after ``value``, and is not part of pre or post.
"""

from .spec import ffn

# config.model_type -> Adapter
ADAPTERS = {
    "lfm2": ffn("layers", pre="feed_forward.w1", post="feed_forward.w2", gated=True),
    "lfm3": ffn("layers", pre="feed_forward.w1", post="feed_forward.w2", gated=True),
    "rwkv": ffn("blocks", pre="feed_forward.key", post="feed_forward.value"),
}
