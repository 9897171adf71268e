"""Trainer wiring of the zoo's MLP-Mixer image classifier.

timm's ``MlpMixer`` maps images to logits; ``MixerForImageClassification`` wraps it so that
``transformers.Trainer`` can drive it (``pixel_values, labels -> loss, logits``). ``scripts/train_mixer.py``
and ``benchmarks/`` (``benchmarks/run.py mixer``) build their Trainer and NerveCallback with these.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MixerForImageClassification(nn.Module):
    """``pixel_values [B, C, H, W]`` (+ ``labels [B]``) -> ``ImageClassifierOutput(loss, logits [B, classes])``."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer  # timm MlpMixer; NerVE sites are found under "mixer.blocks"

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.mixer(pixel_values)  # [B, num_classes]
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def compute_accuracy(eval_pred) -> dict:
    """Trainer ``compute_metrics``: top-1 accuracy of the logits."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits  # [N, classes]
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def build_trainer(model, train_dataset, eval_dataset, training_args, optimizer, callbacks=()):
    """A Trainer for ``MixerForImageClassification`` on ``nerve_zoo.load_image_dataset`` splits."""
    from transformers import Trainer, default_data_collator

    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        compute_metrics=compute_accuracy,
        optimizers=(optimizer, None),  # the Trainer builds the lr schedule around our optimizer
        callbacks=list(callbacks),
    )


def nerve_callback(model: MixerForImageClassification, every_n_steps: int, max_tokens: int | None = None):
    """A NerveCallback on the wrapped Mixer's token-mixing (FFN1) and channel-mixing (FFN2) MLPs, eval only."""
    import model_adapters
    from nerve_hf import NerveCallback

    adapter = model_adapters.get_adapter(model.mixer)  # site paths are suffixes: "blocks" matches "mixer.blocks"
    return NerveCallback(
        every_n_steps=every_n_steps,
        measure_train=False,
        measure_eval=True,
        max_tokens=max_tokens,
        log_per_site=False,
        flow=False,  # the zoo reproduces the paper's pre/post metrics only
        adapter=adapter,
    )
