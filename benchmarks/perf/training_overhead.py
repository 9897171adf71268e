"""Training overhead of NerveCallback against no callback and against the paper's approach.

Trainer runs of the demo's GPT-2 (the ``full`` preset of ``scripts/demo.py``: 4 layers, n_embd 128,
d_ff 512, context 128, vocabulary 4096, 8 sequences per step; random tokens instead of the stdlib
corpus) that differ only in their callbacks:

* ``none``: no measurement.
* ``nerve``: ``NerveCallback(every_n_steps=N)`` (streaming float64 covariance, O(D²) memory per FFN).
* ``nerve_pr``: ``NerveCallback(every_n_steps=N, metrics="pr")``: PR only, no eigendecomposition.
* ``nerve_f32``: ``NerveCallback(every_n_steps=N, spectra_dtype="float32")``: float32 eigendecompositions.
* ``nerve_f32_noflow``: the same without the variance flow (``flow=False``): pre/post only, as the paper.
* ``nerve_before``: ``nerve`` with the library's code as it was before issue #29's clean-up (the finiteness test
  of each covariance by ``isfinite(Σ).all()``), kept here only so that before and after are measured in one run.
* ``paper`` (the baseline): a float32 re-implementation of the approach of the paper's released code: at a
  measured step it keeps a copy of every pre/post activation of that step's micro-batches, then concatenates
  them and computes one float32 covariance and one float32 ``eigvalsh`` per matrix: O(N·D) memory. (The
  released code also calls ``gc.collect()`` per layer; that is left out here, so the baseline is faster than
  the original.) Every ratio is stated against it (``event_vs_paper``: one measurement's cost over the
  paper's).
* ``paper_f64``: the same in float64 (two-pass covariance, float64 eigenvalues), the baseline's second row
  (named ``naive`` in result files before issue #29).

Each run is a fresh subprocess (so peak RSS belongs to that run alone); runs of the three kinds are
alternated and repeated, and medians are reported:

1. ``overhead``: wall time of ``trainer.train()`` relative to ``none`` at every_n_steps 10 and 100, and a
   per-step decomposition (median duration of measured steps minus that of unmeasured ones = cost of one
   measurement event, divided by N unmeasured steps), which resolves a 1% overhead far better than
   end-to-end times on a noisy machine. ``--quick`` runs every_n_steps 10 only and projects the
   overhead at 100 from the measured event cost (labelled ``projected``).
2. ``memory sweep``: peak RSS (and CUDA max allocated) against tokens per measurement (gradient
   accumulation grows the measured step): NerveCallback stays flat, the paper's approach grows linearly.

Run: ``python benchmarks/perf/training_overhead.py --device auto [--quick] [--d-ff 1024 --batch 16]``
(``--d-ff`` and ``--batch`` change the FFN width and the sequences per step from the demo's; the file name
then carries them. ``--shape gpt2-small`` trains GPT-2 small's shape instead, 12 x n_embd 768, d_ff 3072,
vocabulary 50257, in bf16 on CUDA: with ``--batch 512`` that is 64k tokens per step, the GPU target's
setting.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import REPO, add_common_args, apply_threads, current_rss_mb, devices, peak_rss_mb, write_result


def demo_preset() -> dict:
    """The ``full`` preset of ``scripts/demo.py`` (what ``bash dev.sh demo`` trains), from the data file
    ``scripts/demo_presets.json`` that the demo reads."""
    return json.loads((REPO / "scripts" / "demo_presets.json").read_text())["full"]


_DEMO = demo_preset()
MODEL = dict(
    n_layer=_DEMO["n_layer"],
    n_embd=_DEMO["n_embd"],
    n_head=_DEMO["n_head"],
    n_positions=_DEMO["block_size"],
    n_inner=4 * _DEMO["n_embd"],
    vocab_size=_DEMO["vocab_size"],
)  # GPT-2's d_ff is 4 x n_embd
SEQ = _DEMO["block_size"]  # tokens per sequence
# --shape: the demo's model, or GPT-2 small's (12 x n_embd 768, d_ff 3072, its vocabulary), bf16 on CUDA
SHAPES = {
    "demo": MODEL,
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, n_positions=SEQ, n_inner=3072, vocab_size=50257),
}
BATCH = _DEMO["batch_size"]  # sequences per micro-batch


# ----------------------------------------------------------------------------- the paper's approach
def _paper_callback_class():
    from transformers import TrainerCallback

    from nerve_hf.metrics import spectrum_metrics

    class PaperFullActivationCallback(TrainerCallback):
        """Keeps every pre/post activation of a measured step; one covariance and one ``eigvalsh`` per matrix
        afterwards, in ``dtype`` (float32: the paper's released code; float64: the second row)."""

        def __init__(self, every_n_steps: int, dtype: torch.dtype = torch.float32) -> None:
            self.every_n_steps, self.dtype = every_n_steps, dtype
            self.handles = []
            self.kept: dict[int, tuple[list, list]] = {}
            self.last: dict | None = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if (state.global_step + 1) % self.every_n_steps:
                return
            for layer, block in enumerate(model.transformer.h):
                pre, post = self.kept.setdefault(layer, ([], []))
                self.handles.append(
                    block.mlp.c_fc.register_forward_hook(lambda m, a, out, pre=pre: pre.append(out.detach().clone()))
                )  # [B, T, D]
                self.handles.append(
                    block.mlp.c_proj.register_forward_pre_hook(
                        lambda m, a, post=post: post.append(a[0].detach().clone())
                    )
                )  # [B, T, D]

        def on_step_end(self, args, state, control, **kwargs):
            if not self.handles:
                return
            for handle in self.handles:
                handle.remove()
            self.handles = []
            results = {}
            for layer, (pre, post) in self.kept.items():
                spectra = []
                for chunks in (pre, post):
                    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).to(self.dtype)  # [N, D]
                    x = x - x.mean(0)
                    cov = x.T @ x / (x.shape[0] - 1)  # [D, D]
                    spectra.append(torch.linalg.eigvalsh(cov).flip(-1))
                metrics = spectrum_metrics(spectra[0].double().cpu(), spectra[1].double().cpu())
                results[f"ffn.{layer}"] = {k: float(v) for k, v in metrics.items()}
            self.kept = {}
            self.last = results

    return PaperFullActivationCallback


def _code_before_issue_29() -> None:
    """Put back, in this worker process only, what issue #29 changed on a measurement's path: the finiteness
    test of every covariance by a ``[D, D]`` boolean temporary (now its extremes alone,
    :func:`nerve_hf.spectra.exact.all_finite`)."""
    from nerve_hf.spectra import exact

    exact.all_finite = lambda matrices: torch.isfinite(matrices).flatten(-2).all(dim=-1)


# ----------------------------------------------------------------------------- one run (a subprocess)
def worker(config: dict) -> dict:
    apply_threads(config.get("threads"))
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from nerve_hf import NerveCallback

    device = torch.device(config["device"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            **config["model"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    batch, accum, steps = config["batch"], config["grad_accum"], config["max_steps"]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config["model"]["vocab_size"], (batch * accum * steps, SEQ), generator=generator)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.durations, self.measured, self._start = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.durations.append(time.perf_counter() - self._start)
            self.measured.append(state.global_step % config["every_n"] == 0)

    kind = config["callback"]
    if kind == "nerve_before":
        _code_before_issue_29()
    callbacks = []
    if kind in NERVE_KINDS:
        callbacks.append(
            NerveCallback(
                every_n_steps=config["every_n"],
                write_jsonl=False,
                measure_eval=False,
                metrics="pr" if kind == "nerve_pr" else "all",
                spectra_dtype="float32" if kind.startswith("nerve_f32") else "float64",
                flow=kind != "nerve_f32_noflow",
            )
        )
    elif kind in PAPER_KINDS:
        callbacks.append(_paper_callback_class()(config["every_n"], PAPER_KINDS[kind]))
    timer = StepTimes()
    callbacks.append(timer)  # after the measuring callback: its on_step_end time is inside the step

    args = TrainingArguments(
        output_dir=config["output_dir"],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=config["every_n"],
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=device.type == "cpu",
        bf16=config.get("bf16", False),
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_mb()
    start = time.perf_counter()
    trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    first = {}
    if kind in NERVE_KINDS:
        first = {k.split("/")[1]: v for k, v in trainer.state.log_history[0].items() if k.endswith("/pr_pre")}
    elif kind in PAPER_KINDS and callbacks[0].last is not None:
        first = {site: m["pr_pre"] for site, m in callbacks[0].last.items()}
    return {
        **config,
        "train_seconds": seconds,
        "step_seconds": timer.durations,
        "measured": timer.measured,
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "tokens_per_measurement": batch * accum * SEQ,
        "pr_pre_last_measurement": first,
    }


def run_worker(config: dict) -> dict:
    """Run ``config`` in a fresh Python process and return its result."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the two experiments
NERVE_KINDS = ("nerve", "nerve_pr", "nerve_f32", "nerve_f32_noflow", "nerve_before")
PAPER_KINDS = {"paper": torch.float32, "paper_f64": torch.float64}  # the baseline first
KINDS = ("none", *NERVE_KINDS, *PAPER_KINDS)


def overhead(device: torch.device, args, tmp: Path) -> dict:
    steps = {10: 30} if args.quick else {10: 50, 100: 200}
    repeats = args.repeats or (1 if args.quick else 2)
    batch = args.batch
    results = {}
    for every_n, max_steps in steps.items():
        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for rep in range(repeats):
            order = list(KINDS) if rep % 2 == 0 else list(reversed(KINDS))  # alternate the order
            for kind in order:
                config = dict(
                    callback=kind,
                    every_n=every_n,
                    max_steps=max_steps,
                    batch=batch,
                    grad_accum=1,
                    device=str(device),
                    threads=args.threads,
                    output_dir=str(tmp / kind),
                    model=model_shape(args),
                    bf16=args.shape == "gpt2-small" and device.type == "cuda",
                )
                result = run_worker(config)
                runs[kind].append(result)
                print(
                    f"  every {every_n:>3} steps, {kind:>5}: {result['train_seconds']:6.2f} s, "
                    f"peak RSS {result['peak_rss_mb']:7.1f} MB",
                    flush=True,
                )
        results[str(every_n)] = summarise_overhead(runs, every_n)
        for kind in KINDS[1:]:
            k = results[str(every_n)]["kinds"][kind]
            print(
                f"  every {every_n}: {kind:>8}: wall {k['wall_overhead_pct']:+6.1f}%, one measurement "
                f"{k['measurement_event_seconds']:.3f} s = {k['per_step_overhead_pct']:.1f}% at every {every_n}, "
                f"{k['projected_overhead_pct_at_every_100']:.2f}% projected at every 100",
                flush=True,
            )
    return results


def summarise_overhead(runs: dict[str, list[dict]], every_n: int) -> dict:
    base = statistics.median(r["train_seconds"] for r in runs["none"])
    # Cost of one measurement: median measured step minus median unmeasured step (same runs), and the
    # overhead it implies at this frequency relative to an unmeasured step.
    plain_steps = [t for r in runs["none"] for t in r["step_seconds"]]
    step_median = statistics.median(plain_steps)
    summary = {
        "max_steps": runs["none"][0]["max_steps"],
        "none_train_seconds_median": base,
        "unmeasured_step_seconds_median": step_median,
        "kinds": {},
    }
    events = {}
    for kind in KINDS[1:]:
        seconds = [r["train_seconds"] for r in runs[kind]]
        measured = [t for r in runs[kind] for t, m in zip(r["step_seconds"], r["measured"]) if m]
        unmeasured = [t for r in runs[kind] for t, m in zip(r["step_seconds"], r["measured"]) if not m]
        event = statistics.median(measured) - statistics.median(unmeasured)
        events[kind] = event
        summary["kinds"][kind] = {
            "train_seconds": seconds,
            "wall_ratio_median": statistics.median(seconds) / base,  # vs none
            "wall_overhead_pct": 100 * (statistics.median(seconds) / base - 1),
            "measurement_event_seconds": event,
            "per_step_overhead_pct": 100 * event / (every_n * statistics.median(unmeasured)),
            "projected_overhead_pct_at_every_100": 100 * event / (100 * statistics.median(unmeasured)),
            "projected_overhead_pct_at_every_1000": 100 * event / (1000 * statistics.median(unmeasured)),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[kind]),
            "cuda_max_allocated_mb": runs[kind][0]["cuda_max_allocated_mb"],
            "pr_pre_last_measurement": runs[kind][0]["pr_pre_last_measurement"],
        }
    paper = summary["kinds"]["paper"]["per_step_overhead_pct"]
    for kind in KINDS[1:]:  # one measurement's cost over the paper's float32 approach's
        k = summary["kinds"][kind]
        k["event_vs_paper"] = events[kind] / events["paper"] if events["paper"] > 0 else None  # seconds
        # each event over its own runs' unmeasured step first: robust to a machine whose load changes between runs
        k["normalised_event_vs_paper"] = k["per_step_overhead_pct"] / paper if paper > 0 else None
    summary["kinds"]["none"] = {
        "train_seconds": [r["train_seconds"] for r in runs["none"]],
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs["none"]),
        "cuda_max_allocated_mb": runs["none"][0]["cuda_max_allocated_mb"],
    }
    return summary


def memory_sweep(device: torch.device, args, tmp: Path) -> dict:
    accums = [1, 8] if args.quick else [1, 4, 16, 32]
    batch = args.batch
    rows = []
    for accum in accums:
        row = {"grad_accum": accum, "tokens_per_measurement": batch * accum * SEQ}
        for kind in ("none", "nerve", "paper"):
            config = dict(
                callback=kind,
                every_n=1,
                max_steps=2,
                batch=batch,
                grad_accum=accum,
                device=str(device),
                threads=args.threads,
                output_dir=str(tmp / kind),
                model=model_shape(args),
                bf16=args.shape == "gpt2-small" and device.type == "cuda",
            )
            result = run_worker(config)
            row[kind] = {"peak_rss_mb": result["peak_rss_mb"], "cuda_max_allocated_mb": result["cuda_max_allocated_mb"]}
        for kind in ("nerve", "paper"):
            row[kind]["peak_rss_over_none_mb"] = row[kind]["peak_rss_mb"] - row["none"]["peak_rss_mb"]
            if row[kind]["cuda_max_allocated_mb"] is not None:
                row[kind]["cuda_over_none_mb"] = (
                    row[kind]["cuda_max_allocated_mb"] - row["none"]["cuda_max_allocated_mb"]
                )
        print(
            f"  {row['tokens_per_measurement']:>7} tokens/measurement: peak RSS over none: nerve "
            f"{row['nerve']['peak_rss_over_none_mb']:7.1f} MB, paper {row['paper']['peak_rss_over_none_mb']:7.1f} MB",
            flush=True,
        )
        rows.append(row)
    d, layers = model_shape(args)["n_inner"], model_shape(args)["n_layer"]
    return {
        "rows": rows,
        "expected_nerve_state_mb": layers * 2 * (d * d + d) * 8 / 2**20,
        "expected_paper_mb_per_1k_tokens": layers * 2 * 1000 * d * 4 / 2**20,  # fp32 copies of pre and post
    }


def model_shape(args) -> dict:
    """The GPT2Config fields of the run: ``--shape``'s, with ``--d-ff`` overriding its FFN width."""
    shape = dict(SHAPES[args.shape])
    if args.d_ff is not None:
        shape["n_inner"] = args.d_ff
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-sweep", action="store_true", help="only the overhead runs")
    parser.add_argument("--skip-overhead", action="store_true", help="only the memory sweep")
    parser.add_argument(
        "--d-ff", type=int, default=None, help=f"FFN width (default: the shape's; the demo's is {MODEL['n_inner']})"
    )
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="demo", help="model shape: the demo's GPT-2 or GPT-2 small's"
    )
    parser.add_argument("--batch", type=int, default=BATCH, help=f"sequences per step (default: the demo's {BATCH})")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs of each kind, medians kept (default 2; --quick 1)"
    )
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    apply_threads(args.threads)  # recorded in the environment; each worker applies it too
    import tempfile

    for device in devices(args.device):
        with tempfile.TemporaryDirectory() as tmp:
            payload = {"model": model_shape(args), "seq_len": SEQ, "batch": args.batch, "shape": args.shape}
            if not args.skip_overhead:
                print(f"{device}: overhead runs", flush=True)
                payload["overhead"] = overhead(device, args, Path(tmp))
            if not args.skip_sweep:
                print(f"{device}: memory sweep", flush=True)
                payload["memory_sweep"] = memory_sweep(device, args, Path(tmp))
        custom = args.d_ff is not None or args.batch != BATCH
        d_ff = model_shape(args)["n_inner"]
        name = f"training_overhead_d{d_ff}_b{args.batch}" if custom else "training_overhead"
        if args.shape != "demo":
            name = f"training_overhead_{args.shape}_b{args.batch}"
        write_result(args.out, name, device, payload, args.quick)


if __name__ == "__main__":
    main()
