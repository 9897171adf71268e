"""The NerVE paper's reported numbers (Jha & Reagen, ICLR 2026, arXiv 2603.06922), set beside ours by tables.py."""

# experiment -> run -> eval perplexity; GPT-2 125M on CodeParrot, context 128 (§3.1-3.3)
PAPER_PERPLEXITY: dict[str, dict[str, float]] = {
    "gpt2_activations": {"gelu": 2.714, "relu": 2.774},
    "gpt2_normfree": {"normfree-gelu": 3.223, "normfree-relu": 2.988, "normfree-lrelu": 3.081},
    "gpt2_weightnorm": {"wnorm": 3.041, "snorm": 3.000, "hnorm": 3.122},
    # GPT-2 on FineWeb at context 512 ("short") / 1024 ("long")
    "optimizers": {
        "adamw-short": 33.24,
        "adamw-long": 39.26,
        "dion-short": 27.68,
        "dion-long": 33.60,
        "muon-short": 25.68,
        "muon-long": 30.95,
    },
}

# run -> metric -> within-run Pearson r with eval loss (GPT-2 on CodeParrot)
PAPER_WITHIN_RUN_R: dict[str, dict[str, float]] = {
    "gelu": {
        "se_pre": -0.992,
        "se_post": -0.868,
        "pr_pre": -0.985,
        "pr_post": -0.941,
        "eee_pre": 0.954,
        "eee_post": 0.955,
    },
    "relu": {
        "se_pre": -0.992,
        "se_post": -0.924,
        "pr_pre": -0.957,
        "pr_post": -0.945,
        "eee_pre": 0.936,
        "eee_post": 0.980,
    },
}

# across the FFN width sweep, r of SE_pre and PR_pre with eval loss lies in this interval
PAPER_WIDTH_R_RANGE: tuple[float, float] = (-0.99, -0.97)

PAPER_REFERENCE = "Jha & Reagen, NerVE, ICLR 2026 (arXiv 2603.06922)"
