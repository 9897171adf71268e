"""timm's VisionTransformer, built with ``timm.create_model(..., pretrained=False)`` at odd sizes, trained
for two steps with its own layers under an FFNTracker: every patch row counts (class and register tokens
included: a ViT attends to all of them), against a float64 capture of each block's ``mlp.fc1`` (or the
gate ``mlp.fc1_g`` of timm's SwiGLU) output and ``mlp.fc2`` input by this file's own hooks.

timm's ``GluMlp`` (one fused fc1 whose halves are gate and value) is refused by detection with a message:
checked too, so it can never be measured silently wrong."""

from __future__ import annotations

import pytest
import torch
from reference import activation_metrics
from timm import create_model
from timm.layers import GluMlp, SwiGLU

from nerve_hf import FFNTracker
from nerve_hf.metrics import METRIC_NAMES

DEPTH, IMAGE, PATCH = 2, 20, 4
BATCHES = (3, 5)  # images per step
TOKENS_PER_IMAGE = (IMAGE // PATCH) ** 2 + 1 + 2  # patches, class token, two register tokens


def vit(mlp_layer=None, hidden: int = 37):
    """A ViT with timm's Mlp (fc1, GELU, fc2), or with `mlp_layer` and SiLU; FFN width `hidden`."""
    torch.manual_seed(0)
    options = {} if mlp_layer is None else {"mlp_layer": mlp_layer, "act_layer": torch.nn.SiLU}
    return create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH, embed_dim=24, depth=DEPTH,
        num_heads=2, mlp_ratio=hidden / 24, num_classes=3, reg_tokens=2, **options,
    )  # fmt: skip


def capture(model, pre_name: str):
    """float64 (pre rows, post rows) per block, appended to at every call of its FFN."""
    seen = [([], []) for _ in range(DEPTH)]
    handles = []
    for i, block in enumerate(model.blocks):
        pre, post = seen[i]
        handles.append(getattr(block.mlp, pre_name).register_forward_hook(lambda m, a, out, k=pre: k.append(out)))
        handles.append(block.mlp.fc2.register_forward_pre_hook(lambda m, a, k=post: k.append(a[0])))
    return seen, handles


@pytest.mark.parametrize("mlp_layer, pre_name", [(None, "fc1"), (SwiGLU, "fc1_g")], ids=["mlp", "swiglu"])
def test_timm_vit_counts_every_patch_row(mlp_layer, pre_name):
    model = vit(mlp_layer).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    seen, handles = capture(model, pre_name)
    with FFNTracker(model, flow=False) as tracker:
        for batch in BATCHES:
            images = torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)
            labels = torch.randint(0, 3, (batch,), generator=generator)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    for handle in handles:
        handle.remove()
    report = tracker.compute()
    assert [row["site"] for row in report.rows] == [f"ffn.{i}" for i in range(DEPTH)]
    for row, (pre, post) in zip(report.rows, seen):
        pre = torch.cat([x.detach().double().reshape(-1, x.shape[-1]) for x in pre]).numpy()
        post = torch.cat([x.detach().double().reshape(-1, x.shape[-1]) for x in post]).numpy()
        assert row["tokens"] == sum(BATCHES) * TOKENS_PER_IMAGE == pre.shape[0] == post.shape[0]
        assert row["dim"] == pre.shape[1] == 37
        expected = activation_metrics(pre, post)
        for metric in METRIC_NAMES:
            assert row[metric] == pytest.approx(expected[metric], rel=1e-5, abs=1e-7), (row["site"], metric)


def test_timm_vit_with_a_fused_glu_mlp_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="No FFN adapter for VisionTransformer"):
        FFNTracker(vit(GluMlp, hidden=80))
