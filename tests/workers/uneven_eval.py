"""Evaluation only, on an eval set that 2 processes cannot split evenly (the sampler pads it)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

import torch  # noqa: E402
from trainer_helpers import make_trainer  # noqa: E402

from nerve_hf import NerveCallback  # noqa: E402


def main(output_dir: str, n_eval: int, per_device_eval: int) -> None:
    trainer = make_trainer(
        output_dir, [NerveCallback(every_n_steps=1)], n_eval=n_eval, per_device_eval_batch_size=per_device_eval
    )
    trainer.evaluate()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # tear gloo down before exit (its threads can otherwise abort the process)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
