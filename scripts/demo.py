"""Placeholder main job until the training demo lands: spectra of a random tiny GPT-2's FFNs."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nerve_hf import CovarianceAccumulator, metrics


def main() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=257)).eval()
    pre = [CovarianceAccumulator(256) for _ in model.transformer.h]
    post = [CovarianceAccumulator(256) for _ in model.transformer.h]
    hooks = []
    for block, acc_pre, acc_post in zip(model.transformer.h, pre, post):
        hooks.append(block.mlp.c_fc.register_forward_hook(lambda m, i, o, a=acc_pre: a.update(o)))
        hooks.append(block.mlp.c_proj.register_forward_pre_hook(lambda m, i, a=acc_post: a.update(i[0])))
    text = open(metrics.__file__, encoding="utf-8").read().encode()[:4096]
    ids = torch.tensor(list(text)).view(8, -1)  # [8, 512] bytes as tokens
    with torch.no_grad():
        model(input_ids=ids)
    for layer, (a, b) in enumerate(zip(pre, post)):
        values = metrics.spectrum_metrics(a.eigenvalues(), b.eigenvalues())
        print(f"ffn.{layer}: " + "  ".join(f"{k}={v.item():.3f}" for k, v in values.items()))


if __name__ == "__main__":
    main()
