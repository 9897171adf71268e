"""Training under 2 processes where rank 1 fails alone: its eigendecomposition raises at step 2 (while rank 0
waits in the exchange), or its hook fails to record at step 3. Each rank writes its logged values as JSON."""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from trainer_helpers import make_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from nerve_hf import NerveCallback  # noqa: E402
from nerve_hf.stats import covariance  # noqa: E402


class FailOnRankOne(TrainerCallback):
    """On rank 1 only: the eigendecomposition of step 2's measurement raises; at step 3 the first FFN's
    covariance update raises inside the hook (as an allocation failure would)."""

    def __init__(self):
        self.real_eigvalsh, self.real_update = torch.linalg.eigvalsh, covariance.CovarianceAccumulator.update

    def on_step_begin(self, args, state, control, **kwargs):
        if dist.get_rank() != 1:
            return
        step = state.global_step + 1
        real_eigvalsh, real_update = self.real_eigvalsh, self.real_update

        def failing_eigvalsh(matrix, *a, **k):
            raise torch.linalg.LinAlgError("injected on rank 1: the algorithm failed to converge")

        def failing_update(acc, x, *a, **k):
            raise torch.OutOfMemoryError("injected on rank 1: out of memory")

        torch.linalg.eigvalsh = failing_eigvalsh if step == 2 else real_eigvalsh
        covariance.CovarianceAccumulator.update = failing_update if step == 3 else real_update


def main(output_dir: str) -> None:
    warnings.simplefilter("always")
    callback = NerveCallback(every_n_steps=1, flow=False, save_spectra=False)
    trainer = make_trainer(output_dir, [callback, FailOnRankOne()], max_steps=4, logging_steps=1, eval_strategy="no")
    with warnings.catch_warnings(record=True) as caught:
        trainer.train()
    dist.barrier()
    logged = {
        entry["step"]: [entry[f"nerve/ffn.{i}/se_pre"] for i in (0, 1)]
        for entry in trainer.state.log_history
        if "nerve/ffn.0/se_pre" in entry
    }
    out = {"logged": logged, "warnings": [str(w.message) for w in caught], "step": trainer.state.global_step}
    (Path(output_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.barrier()  # tear gloo down before exit (its threads can otherwise abort the process)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
