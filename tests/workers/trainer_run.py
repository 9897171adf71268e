"""One optimizer step over a 4-sequence dataset (every sequence in the global batch) and one evaluation."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

import torch  # noqa: E402
from trainer_helpers import make_trainer  # noqa: E402

from nerve_hf import NerveCallback  # noqa: E402


def main(output_dir: str, per_device: int) -> None:
    trainer = make_trainer(
        output_dir,
        [NerveCallback(every_n_steps=1)],
        n_train=4,
        n_eval=6,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1,
        per_device_eval_batch_size=1,
        max_steps=1,
        eval_steps=1,
        logging_steps=1,
        learning_rate=0.0,  # eval after the step sees identical weights on 1 and 2 processes
    )
    trainer.train()
    if torch.distributed.is_initialized():
        # Tear gloo down before interpreter exit: its threads otherwise can abort the process (SIGABRT).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
