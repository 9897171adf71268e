"""A Trainer run with NerveCallback where the optional packages cannot be imported (the core install).

Run as ``python lean_install.py OUT_DIR``. A ``sys.meta_path`` finder and ``sys.modules[name] = None`` make every
package of the extras unimportable before anything else is imported (``importlib.util.find_spec`` then reports
them absent, as transformers' availability checks expect of a missing package). The worker trains 2 steps with
evaluation, keeps the evaluation activations of every FFN from its own hooks (``OUT_DIR/eval_acts.pt``), and
tries the optional paths, writing their one-line messages to ``OUT_DIR/messages.txt``.
"""

import contextlib
import importlib.abc
import io
import sys

BLOCKED = ("pandas", "matplotlib", "timm", "datasets", "evaluate", "sklearn", "tensorboard", "pyarrow", "torchvision")


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


if __name__ == "__main__":  # run as a script only: importing this file blocks nothing
    sys.meta_path.insert(0, Blocker())
    for _name in BLOCKED:
        sys.modules[_name] = None  # `import pandas` raises ImportError; find_spec("pandas") is None

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from nerve_hf import NerveCallback, cli  # noqa: E402
from nerve_hf.errors import MissingExtraError  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(1, 61, (n, 9), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out: str) -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=61, n_positions=16, n_embd=24, n_head=3, n_layer=2, n_inner=37)
    config.bos_token_id = config.eos_token_id = 0
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    model = GPT2LMHeadModel(config)
    acts = {}  # "<layer>/pre" or "<layer>/post" -> list of [batch, seq, 37] tensors of evaluation forwards

    def keep(key, index):
        def hook(module, args, output):
            if not module.training:
                acts.setdefault(key, []).append((args[0] if index else output).detach().clone())

        return hook

    for layer, block in enumerate(model.transformer.h):
        block.mlp.c_fc.register_forward_hook(keep(f"{layer}/pre", 0))
        block.mlp.c_proj.register_forward_hook(keep(f"{layer}/post", 1))
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(8, 1),
        eval_dataset=Tokens(6, 2),
        callbacks=[NerveCallback(every_n_steps=1, flow=False)],
    )
    trainer.train()
    torch.save({key: torch.cat(parts) for key, parts in acts.items()}, f"{out}/eval_acts.pt")
    messages = []  # one line per optional path: "<what>: <the error's message>"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli.main(["report", out])
    messages.append(f"nerve report exit {status}: {err.getvalue().strip()}")
    try:
        from nerve_hf import FFNTracker

        with FFNTracker(model) as tracker, torch.no_grad():
            model(input_ids=torch.randint(1, 61, (2, 9)))
        tracker.compute().to_pandas()
    except MissingExtraError as error:
        messages.append(f"to_pandas: {error}")
    try:
        from nerve_hf.data.digits import load_digits

        load_digits()
    except MissingExtraError as error:
        messages.append(f"load_digits: {error}")
    with open(f"{out}/messages.txt", "w") as handle:
        handle.write("\n".join(messages) + "\n")
    print("lean modules:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m]))


if __name__ == "__main__":
    main(sys.argv[1])
