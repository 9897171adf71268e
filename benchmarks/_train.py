"""Train one run of an experiment with transformers.Trainer + NerveCallback and summarise it."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from _data import image_data, lm_data
from _experts import expert_series, series_records
from _results import rounded
from _settings import RunSettings
from _stats import correlations, nerve_series


def training_arguments(settings: RunSettings, output_dir: str, progress: bool, max_steps: int):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=max(settings.batch_size, 32),
        gradient_accumulation_steps=settings.grad_accum,
        max_steps=max_steps,
        learning_rate=settings.learning_rate,  # the scheduler's peak; our optimizer was built with it
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup_ratio,  # < 1: a share of max_steps
        max_grad_norm=settings.max_grad_norm,
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        logging_steps=settings.eval_every,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=settings.bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=settings.dataloader_workers,
        prediction_loss_only=settings.task == "lm",
        disable_tqdm=not progress,
    )


def eval_schedule_callback(steps):
    """A TrainerCallback that evaluates (and logs) exactly at ``steps``, dense early and sparse later. It runs
    after transformers' DefaultFlowCallback, so its decision replaces the fixed ``eval_steps`` rhythm."""
    from transformers import TrainerCallback

    due = frozenset(steps)

    class EvalSchedule(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_evaluate = control.should_log = state.global_step in due
            return control

    return EvalSchedule()


def check_epochs(settings: RunSettings, n_train_blocks: int | None, max_steps: int) -> None:
    """ValueError before training when the run would pass over its training blocks more than ``max_epochs``."""
    if settings.task != "lm" or settings.max_epochs is None or n_train_blocks is None:
        return
    needed = max_steps * settings.batch_size * settings.grad_accum
    if needed > settings.max_epochs * n_train_blocks:
        raise ValueError(
            f"{max_steps} steps x {settings.batch_size * settings.grad_accum} blocks = {needed} blocks of "
            f"{settings.block_size} tokens, but the training split has {n_train_blocks} "
            f"(max_epochs={settings.max_epochs:g}): raise corpus_max_bytes or lower max_steps"
        )


def check_next_token_loss(model) -> None:
    """ValueError unless the Trainer will report ``model``'s mean next-token loss: a causal LM whose
    ``loss_type`` is not ``ForCausalLM`` has its B*(T-1) token losses divided by B*T (result schema 1)."""
    if getattr(model, "loss_type", None) != "ForCausalLM":
        raise ValueError(
            f"{type(model).__name__} has loss_type {getattr(model, 'loss_type', None)!r}: the Trainer would report "
            "(T-1)/T of its mean next-token loss; set model.loss_type = 'ForCausalLM' where the zoo builds it"
        )


def _max_steps(settings: RunSettings, n_train: int | None) -> int:
    if settings.max_steps > 0:
        return settings.max_steps
    if not n_train or settings.epochs <= 0:
        raise ValueError("set max_steps, or epochs with a dataset of known length")
    per_epoch = math.ceil(n_train / (settings.batch_size * settings.grad_accum))
    return max(1, round(settings.epochs * per_epoch))


def build_run(settings: RunSettings, output_dir: str, progress: bool = True):
    """``(trainer, model, info)`` for one run; nothing is trained yet."""
    from transformers import Trainer, set_seed

    import model_adapters  # noqa: F401  (registers the adapters NerveCallback looks up)
    import nerve_zoo as zoo
    from nerve_hf import NerveCallback

    set_seed(settings.seed)
    if settings.task == "lm":
        train, evaluation, vocab_size, info = lm_data(settings)
        model = zoo.build_model(settings.variant, size=settings.size, vocab_size=vocab_size, **settings.model_overrides)
        check_next_token_loss(model)
        optimizer = zoo.build_optimizer(
            settings.optimizer, model, settings.learning_rate, settings.weight_decay, **settings.optimizer_options
        )
        callback = NerveCallback(
            every_n_steps=settings.eval_every,
            measure_train=False,
            measure_eval=True,
            max_tokens=settings.nerve_max_tokens,
            log_per_site=False,
            flow=False,  # the zoo reproduces the paper's pre/post metrics only
        )
        max_steps = _max_steps(settings, info["train_blocks"])
        check_epochs(settings, info["train_blocks"], max_steps)
        args = training_arguments(settings, output_dir, progress, max_steps)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation,
            optimizers=(optimizer, None),
            callbacks=[callback],
        )
    else:
        from nerve_zoo.image_training import MixerForImageClassification, build_trainer, nerve_callback

        train, evaluation, num_classes, info = image_data(settings)
        mixer = zoo.build_model(
            settings.variant,
            size=settings.size,
            num_classes=num_classes,
            img_size=settings.image_size,
            **settings.model_overrides,
        )
        model = MixerForImageClassification(mixer)
        optimizer = zoo.build_optimizer(
            settings.optimizer, model, settings.learning_rate, settings.weight_decay, **settings.optimizer_options
        )
        callback = nerve_callback(model, settings.eval_every, settings.nerve_max_tokens)
        max_steps = _max_steps(settings, len(train))
        args = training_arguments(settings, output_dir, progress, max_steps)
        trainer = build_trainer(model, train, evaluation, args, optimizer, [callback])
    if settings.eval_dense_every > 0:
        trainer.add_callback(eval_schedule_callback(settings.eval_schedule(max_steps)))
    if not progress:  # --quiet: no per-log dict printing either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer, model, info


def train_run(settings: RunSettings, progress: bool = True, workdir: str | None = None) -> dict:
    """Train one run; return its result entry (final metrics, NerVE series, correlations, provenance)."""
    import nerve_zoo as zoo
    from nerve_hf.sinks.records import RECORDS_FILENAME, read_records

    with tempfile.TemporaryDirectory(prefix="nerve-bench-", dir=workdir) as output_dir:
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer, model, info = build_run(settings, output_dir, progress)
        trainer.train()
        last_eval = max((log["step"] for log in trainer.state.log_history if "eval_loss" in log), default=-1)
        if last_eval != trainer.state.global_step:
            trainer.evaluate()  # the final evaluation is always at the last step
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        records = list(read_records(Path(output_dir) / RECORDS_FILENAME))
    history = [log for log in trainer.state.log_history if "eval_loss" in log]
    train_logs = [log for log in trainer.state.log_history if "loss" in log and "eval_loss" not in log]
    # r is computed on the values as stored (rounded), so that it can be re-derived from the file exactly
    loss_by_step = rounded({int(log["step"]): float(log["eval_loss"]) for log in history})
    series = rounded(nerve_series(series_records(records), split="eval"))  # MoE: a weighted row per layer
    experts = expert_series(records, trainer.state.log_history, split="eval")  # None without routed experts
    final = {"eval_loss": history[-1]["eval_loss"], "step": history[-1]["step"]}
    if settings.task == "lm":
        final["perplexity"] = math.exp(final["eval_loss"]) if final["eval_loss"] < 50 else math.inf
    else:
        final["accuracy"] = history[-1].get("eval_accuracy")
    return {
        "variant": settings.variant,
        "optimizer": settings.optimizer,
        "final": final,
        "history": {
            "step": [int(log["step"]) for log in history],
            "eval_loss": [float(log["eval_loss"]) for log in history],
            **({"eval_accuracy": [log.get("eval_accuracy") for log in history]} if settings.task == "image" else {}),
            "train_step": [int(log["step"]) for log in train_logs],
            "train_loss": [float(log["loss"]) for log in train_logs],
        },
        "nerve": series,
        "correlations": correlations(series, loss_by_step),
        **({"experts": rounded(experts)} if experts is not None else {}),
        "provenance": {
            **info,
            "steps": trainer.state.global_step,
            "tokens_per_step": settings.tokens_per_step if settings.task == "lm" else None,
            "seed": settings.seed,
            "wall_time_s": wall,
            "cpu_time_s": cpu,  # this process's CPU time, all its threads (DataLoader worker processes not in it)
            "parameters": zoo.count_parameters(model),
        },
        "settings": settings.to_dict(),
    }
