"""One optimizer step of the Trainer under DeepSpeed ZeRO-3 on CPU processes (DeepSpeed's CPU accelerator,
gloo without oneCCL; a torch optimizer, not DeepSpeedCPUAdam) with NerveCallback measuring it; beside it
this worker's own hooks keep each rank's FFN pre (``c_fc`` output) and post (``c_proj`` input) rows of
the real tokens in float64 (``rank<r>.npz``), and ``rank<r>.json`` says how many processes the Trainer saw
and whether ZeRO-3 partitioned every parameter; ``data.npz`` holds the sequences (right-padded, with an
attention mask).

DeepSpeed's CPU back end compiles a shared-memory all-reduce extension on first use (a C++ build of about
a minute); it is only a faster path than gloo, so this worker turns it off (``build_shm_op`` returns None,
as DeepSpeed does where the op is unsupported) and every collective goes through gloo."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

import deepspeed.comm.torch  # noqa: E402, F401  (the package's ``torch`` attribute is PyTorch itself)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from distributed_helpers import capture_gpt2_ffn_rows, end_worker  # noqa: E402
from trainer_helpers import VOCAB, tiny_gpt2  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo only: no C++ build (see the docstring)

from nerve_hf import NerveCallback  # noqa: E402

LENGTHS = (9, 4, 7, 2)  # real tokens of the 4 sequences (the one global batch), padded to 9
ZERO3 = {
    "zero_optimization": {"stage": 3},
    "zero_force_ds_cpu_optimizer": False,
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
}


def dataset() -> Dataset:
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), 9), generator=generator)
    mask = (torch.arange(9) < torch.tensor(LENGTHS)[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def main(out: str) -> None:
    model = tiny_gpt2()
    real = []  # the running call's [B, T] mask

    def begin(module, args, kwargs):
        real.append(kwargs["attention_mask"].bool())

    model.register_forward_pre_hook(begin, with_kwargs=True)
    seen = capture_gpt2_ffn_rows(model, real)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, max_steps=1, learning_rate=1e-3, save_strategy="no",
        report_to=[], seed=0, disable_tqdm=True, dataloader_num_workers=0, logging_steps=1, deepspeed=ZERO3,
        optim="adamw_torch", use_cpu=True,
    )  # fmt: skip
    data = dataset()
    callback = NerveCallback(every_n_steps=1, flow=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    rank = torch.distributed.get_rank()
    sized = [p for p in trainer.model_wrapped.module.parameters() if p.ds_numel > 1]
    partitioned = bool(sized) and all(p.ds_tensor.numel() < p.ds_numel for p in sized)
    facts = {"processes": trainer.accelerator.num_processes, "partitioned": partitioned}
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))
    if rank == 0:
        np.savez(Path(out, "data.npz"), input_ids=np.array(data["input_ids"]), mask=np.array(data["attention_mask"]))
    np.savez(Path(out, f"rank{rank}.npz"), **{k: torch.cat(v).detach().numpy() for k, v in seen.items()})
    del trainer, model  # the DeepSpeed engine holds the partitioned parameters' collectives (see end_worker)
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1])
