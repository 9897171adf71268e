"""A training run that SIGKILLs itself right after the NerVE records of step ``kill_at`` were written
(``kill_at`` 0: never), or resumes from a checkpoint; checkpoints every 2 steps, measurement every step."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

from trainer_helpers import make_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from nerve_hf import NerveCallback  # noqa: E402


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # runs after NerveCallback wrote step k
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(output_dir: str, kill_at: int, resume: str) -> None:
    trainer = make_trainer(
        output_dir,
        [NerveCallback(every_n_steps=1), KillAfterStep(kill_at)],
        max_steps=6,
        eval_steps=3,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train(resume_from_checkpoint=resume or None)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
