"""The error of float32 spectra (``spectra_dtype="float32"``) against float64, on real activation spectra.

A GPT-2 (4 layers, n_embd 128, d_ff 512 and 1024: pre-activations of rank <= 128, so rank-deficient) runs
on the embedded stdlib code corpus (tokenised with the locally trained BPE); the same accumulated
covariances are decomposed in float64 and in float32, and the relative error of all seven metrics, pre
and post, is recorded per FFN, with the time of each decomposition. Seeds are fixed, so runs repeat.

Run: ``python benchmarks/perf/spectra_precision.py [--tokens 2048] [--threads 1]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import RESULTS, apply_threads, write_result


def measure(d_ff: int, tokens: int, seed: int = 0) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from nerve_hf import FFNTracker, spectra
    from nerve_hf.data import get_tokenizer, load_stdlib_corpus
    from nerve_hf.metrics import METRIC_NAMES

    tokenizer = get_tokenizer(vocab_size=2048, max_bytes=400_000)
    text = "\n".join(load_stdlib_corpus(max_bytes=400_000)["train"]["text"])
    ids = torch.tensor(tokenizer(text)["input_ids"][:tokens], dtype=torch.long).view(-1, 128)  # [tokens/128, 128]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_head=4, n_layer=4, n_inner=d_ff)
    ).eval()
    tracker = FFNTracker(model)
    with tracker, torch.no_grad():
        for batch in ids.split(8):
            model(input_ids=batch)
    pairs = [(state.pre, state.post) for state in tracker._states]
    timings, values = {}, {}
    for dtype in ("float64", "float32"):
        start = time.perf_counter()
        values[dtype], _ = spectra.metric_values(pairs, "all", dtype)
        timings[dtype] = time.perf_counter() - start
    errors = {
        name: max(abs(b[name] - a[name]) / abs(a[name]) for a, b in zip(values["float64"], values["float32"]))
        for name in METRIC_NAMES
    }
    return {
        "d_ff": d_ff,
        "tokens": int(ids.numel()),
        "ffns": len(pairs),
        "seconds": timings,
        "speedup_float32": timings["float64"] / timings["float32"],
        "max_relative_error": errors,
        "float64": values["float64"],
        "float32": values["float32"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens measured (a multiple of 128)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    apply_threads(args.threads)
    rows = []
    for d_ff in (512, 1024):
        row = measure(d_ff, args.tokens)
        rows.append(row)
        worst = max(row["max_relative_error"].items(), key=lambda kv: kv[1])
        print(
            f"d_ff {d_ff}: float32 spectra {row['speedup_float32']:.2f}x faster; largest relative error "
            f"{worst[1]:.1e} ({worst[0]}); " + ", ".join(f"{k} {v:.1e}" for k, v in row["max_relative_error"].items())
        )
    write_result(Path(args.out), "spectra_precision", torch.device("cpu"), {"rows": rows}, quick=False)


if __name__ == "__main__":
    main()
