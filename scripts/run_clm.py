#!/usr/bin/env python
"""Train or evaluate a causal language model with the Hugging Face Trainer, optionally watching NerVE spectra.

The command line follows transformers' ``examples/pytorch/language-modeling/run_clm.py`` (model, data and
``TrainingArguments`` dataclasses parsed by ``HfArgumentParser``; a single ``.json``/``.yaml`` argument is read
as a config file), plus ``NerveArguments``. With no dataset and no model it runs fully offline: the embedded
stdlib code corpus, a byte-level BPE tokenizer trained on it locally, and a GPT-2 built from its config.

    python scripts/run_clm.py --output_dir runs/clm --do_train --do_eval --max_steps 200 \\
        --config_overrides n_layer=4,n_embd=128,n_head=4,n_positions=128 --block_size 128 \\
        --nerve --nerve_every_n_steps 20

    python scripts/run_clm.py --model_name_or_path gpt2 --dataset_name codeparrot/codeparrot-clean \\
        --streaming --max_steps 1000 --do_train --do_eval --max_eval_samples 200 --output_dir runs/gpt2 --nerve

With ``--nerve`` the console shows the NerVE layer means (``nerve/mean/*``); the values of every single FFN
go to the ``--report_to`` integrations, ``trainer_state.json``, ``eval_results.json`` and
``nerve_metrics.jsonl``.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

logger = logging.getLogger("run_clm")

EXIT_INPUT = 2  # bad input the user can fix: one line on stderr


class ArgumentError(ValueError):
    """A command-line argument the user can fix: ``run_clm.py`` prints it as one line and exits 2."""


DEFAULT_MODEL_TYPE = "gpt2"  # from-scratch architecture when neither a model nor a config is named
DEFAULT_STREAMING_EVAL_BLOCKS = 1000  # eval blocks taken from a stream when --max_eval_samples is not set


@dataclass
class ModelArguments:
    """Which model (and tokenizer) to train: a pretrained checkpoint, or a config to build from scratch."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Local directory or Hub id of a pretrained model. Leave unset to train from scratch."},
    )
    model_type: Optional[str] = field(
        default=None,
        metadata={
            "help": f"Architecture to build from scratch (a transformers model_type); default {DEFAULT_MODEL_TYPE!r}."
        },
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config (local dir or Hub id) to build from scratch, if not the model's own."}
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": "From scratch only: comma list of config changes, e.g. 'n_embd=64,n_layer=2,resid_pdrop=0.2'."
        },
    )
    tokenizer_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Tokenizer (local dir or Hub id). Default: the model's, else the embedded corpus's local BPE."
        },
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where downloaded models and datasets are cached (Hugging Face cache if unset)."},
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={"help": "Use a fast (Rust `tokenizers`) tokenizer where the named tokenizer has one."},
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private/gated models and datasets."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the Hub (only for repositories you trust)."}
    )
    dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "Load pretrained weights in this dtype.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    low_cpu_mem_usage: bool = field(
        default=False,
        metadata={
            "help": "Create the model empty and load the weights into it (transformers 5 always does; older "
            "versions take the flag). With no --model_name_or_path it has no effect."
        },
    )

    def __post_init__(self):
        if self.config_overrides is not None and (self.model_name_or_path or self.config_name):
            raise ArgumentError(
                "--config_overrides only applies when building from scratch (no --model_name_or_path/--config_name)"
            )


@dataclass
class DataTrainingArguments:
    """Which text to train and evaluate on, and how to cut it into blocks."""

    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Hub dataset (e.g. codeparrot/codeparrot-clean, allenai/c4, HuggingFaceFW/fineweb) or an embedded "
            "corpus ('stdlib-code', offline). Default: the embedded corpus when no files are given either."
        },
    )
    dataset_config_name: Optional[str] = field(
        default=None,
        metadata={"help": "Dataset subset, e.g. 'en' for c4, 'sample-10BT' for fineweb (known defaults apply)."},
    )
    text_column_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Column with the text. Default: known per dataset (codeparrot: 'content'), else the first of "
            "text, content, code, document, sentence, else the first string column."
        },
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Local training text: .txt, .json, .jsonl or .csv."}
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Local evaluation text, same format as --train_file."}
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only this many training blocks (after grouping), for quick runs."}
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": "Keep only this many evaluation blocks (after grouping); streaming default "
            f"{DEFAULT_STREAMING_EVAL_BLOCKS}."
        },
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset instead of downloading it (needs --max_steps)."}
    )
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "Tokens per training sequence. Default: min(model context, tokenizer max length, 1024)."},
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenize again instead of reusing the datasets cache of an earlier run."}
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Percent of the train split held out for evaluation when there is no validation split."},
    )
    streaming_validation_docs: int = field(
        default=1000,
        metadata={"help": "Streaming without a validation split: documents held out from the start of the stream."},
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes for tokenization (map-style datasets only)."}
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files."})
    embedded_max_bytes: int = field(
        default=3_000_000,
        metadata={"help": "Embedded corpus only: cap on its size in bytes (the tokenizer is cached per cap)."},
    )
    embedded_vocab_size: int = field(
        default=8192,
        metadata={"help": "Vocabulary size of the locally trained tokenizer (when no tokenizer is named)."},
    )

    def __post_init__(self):
        if self.streaming and (self.train_file or self.validation_file):
            raise ArgumentError("--streaming applies to --dataset_name, not to local files")


def _nerve_arguments():
    """``NerveArguments``: ``--nerve`` plus every ``NerveConfig`` field as ``--nerve_<field>`` (its type,
    default and help come from the field itself, and so does its check)."""
    from dataclasses import make_dataclass

    from nerve_hf.integrations.callback import NerveConfig
    from nerve_hf.options import command_line_fields, from_command_line

    def __post_init__(self):
        self.config()  # check every --nerve_* value now, with the flag's name in the error

    def config(self) -> NerveConfig:
        """The ``NerveConfig`` these flags describe."""
        values = {name: value for name, value in vars(self).items() if name.startswith(NERVE_PREFIX)}
        return from_command_line(NerveConfig, values, NERVE_PREFIX)

    nerve = (
        "nerve",
        bool,
        field(default=False, metadata={"help": "Track NerVE spectral metrics with nerve_hf.NerveCallback."}),
    )
    return make_dataclass(
        "NerveArguments",
        [nerve, *command_line_fields(NerveConfig, NERVE_PREFIX)],
        namespace={
            "__post_init__": __post_init__,
            "config": config,
            "__doc__": "NerVE: eigenspectra of each FFN's pre-/post-activation covariance, measured while training.",
            "_argument_group_name": "NerVE (nerve_hf.NerveCallback; every NerveConfig option)",
        },
    )


NERVE_PREFIX = "nerve_"
NerveArguments = _nerve_arguments()


def build_parser():
    """The command line's parser: the ``--nerve*`` flags first, as one argument group (``--help`` lists them
    before the ~800 lines of model, data and ``TrainingArguments`` flags), each ``--no_nerve_<flag>`` saying
    what it turns off. Its dataclasses, in parse order: NerveArguments, ModelArguments, DataTrainingArguments,
    TrainingArguments."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((NerveArguments, ModelArguments, DataTrainingArguments, TrainingArguments))
    parser.allow_abbrev = False  # a prefix such as --nerve_every_n_step is an unknown flag, not a silent match
    parser.usage = (
        "%(prog)s [--nerve] [--nerve_<option> VALUE ...] [model, data and TrainingArguments flags ...]\n"
        "       %(prog)s ARGS.json | ARGS.yaml"
    )  # argparse's own usage lists all ~250 flags before the first description
    nerve = next(group for group in parser._action_groups if group.title == NerveArguments._argument_group_name)
    parser._action_groups.remove(nerve)
    parser._action_groups.insert(1, nerve)  # after the positionals, before "options" (argparse prints in order)
    for action in parser._actions:
        negative = next((o for o in action.option_strings if o.startswith(f"--no_{NERVE_PREFIX}")), None)
        if negative is not None:
            action.help = f"turn --{action.dest} off; it is on by default"
    return parser


def parse_args(argv: Optional[list[str]] = None):
    """Parse the command line (or ``argv``); a single ``.json``/``.yaml`` argument is a config file.
    Returns ``(model_args, data_args, training_args, nerve_args)``."""
    parser = build_parser()
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) == 1 and args[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=args[0])
    elif len(args) == 1 and args[0].endswith((".yaml", ".yml")):
        parsed = parser.parse_yaml_file(yaml_file=args[0])
    else:
        parsed = parser.parse_args_into_dataclasses(
            args=split_comma_lists(args, LIST_FLAGS), return_remaining_strings=True
        )
        refuse_unknown(parsed[-1], parser)
        parsed = parsed[:-1]
    nerve, model, data, training = parsed[:4]
    return (model, data, training, nerve, *parsed[4:])


def refuse_unknown(remaining: list[str], parser) -> None:
    """Arguments no flag took: an :class:`ArgumentError` naming the first, with the closest flag if any."""
    if not remaining:
        return
    from difflib import get_close_matches

    unknown = next((arg for arg in remaining if arg.startswith("-")), remaining[0])
    flag = unknown.partition("=")[0]
    known = [option for action in parser._actions for option in action.option_strings]
    close = get_close_matches(flag, known, n=1)
    hint = f"; did you mean {close[0]}?" if close and flag.startswith("-") else ""
    what = "unknown flag" if flag.startswith("-") else "unexpected argument"
    raise ArgumentError(f"{what} {flag}{hint} (see --help)")


LIST_FLAGS = ("--nerve_layers",)  # list flags that also take "0,5,-1" (the form of upstream's comma lists)


def split_comma_lists(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """``--flag 0,5 -1`` and ``--flag=0,5`` as ``--flag 0 5 -1``: the values of a list flag may be given
    separated by commas, spaces or both.

    >>> split_comma_lists(["--nerve_layers", "1,99", "--x", "2,3", "--nerve_layers=0,1"], ("--nerve_layers",))
    ['--nerve_layers', '1', '99', '--x', '2,3', '--nerve_layers', '0', '1']
    """
    out, in_list = [], False
    for arg in args:
        flag, equals, value = arg.partition("=")
        if arg.startswith("--"):
            in_list = flag in flags
            out.extend([flag, *[v for v in value.split(",") if v]] if in_list and equals else [arg])
        elif in_list:
            out.extend(v for v in arg.split(",") if v)
        else:
            out.append(arg)
    return out


def setup_logging(training_args) -> None:
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()  # --log_level; WARNING by default, replicas quieter
    ours = min(level, logging.INFO) if training_args.should_log else level  # our own progress notes on rank 0
    for name in ("run_clm", "nerve_hf"):
        logging.getLogger(name).setLevel(ours)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def load_tokenizer(model_args: ModelArguments, data_args: DataTrainingArguments):
    """Named tokenizer, else the model's, else the embedded corpus's locally trained BPE (offline)."""
    from transformers import AutoTokenizer

    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source:
        return AutoTokenizer.from_pretrained(
            source,
            cache_dir=model_args.cache_dir,
            use_fast=model_args.use_fast_tokenizer,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    from nerve_hf.data import get_tokenizer

    logger.info("no tokenizer named: using the byte-level BPE trained locally on the embedded stdlib corpus")
    return get_tokenizer(vocab_size=data_args.embedded_vocab_size, max_bytes=data_args.embedded_max_bytes)


def build_config(model_args: ModelArguments, tokenizer):
    from transformers import CONFIG_MAPPING, AutoConfig

    hub_kwargs = dict(
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if model_args.model_name_or_path or model_args.config_name:
        return AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path, **hub_kwargs)

    model_type = model_args.model_type or DEFAULT_MODEL_TYPE
    if model_type not in CONFIG_MAPPING:
        raise ArgumentError(f"unknown --model_type {model_type!r}; choose from {sorted(CONFIG_MAPPING.keys())}")
    config = CONFIG_MAPPING[model_type]()
    # the tokenizer defines the vocabulary of a model trained from scratch
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            setattr(config, name, getattr(tokenizer, name))
    if model_args.config_overrides:
        logger.info("config overrides: %s", model_args.config_overrides)
        apply_config_overrides(config, model_args.config_overrides)
    return config


def _parse_override(key: str, text: str, current, config_name: str = "the config"):
    """Typed like the config's current value; values that default to None (GPT-2's n_inner) parse as literals."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ArgumentError(f"--config_overrides {key}={text}: {config_name}.{key} takes true or false")
        return lowered in ("true", "1", "yes")
    if isinstance(current, (int, float)):
        kind = float if isinstance(current, float) or "." in text or "e" in text.lower() else int
        try:
            return kind(text)
        except ValueError:
            wanted = "an integer" if isinstance(current, int) else "a number"
            raise ArgumentError(
                f"--config_overrides {key}={text}: {config_name}.{key} takes {wanted} (its value is {current!r})"
            ) from None
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)  # None-valued defaults: ints, floats, None, lists
    except (ValueError, SyntaxError):
        return text


def apply_config_overrides(config, overrides: str) -> None:
    """Apply ``"k=v,k2=v2"`` to a config. Unlike ``PretrainedConfig.update_from_string``, keys whose default is
    None can be set too (``n_inner=37``)."""
    for item in overrides.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ArgumentError(f"--config_overrides: expected key=value, got {item!r}")
        if not hasattr(config, key):
            raise ArgumentError(f"--config_overrides: {type(config).__name__} has no attribute {key!r}")
        setattr(config, key, _parse_override(key, value.strip(), getattr(config, key), type(config).__name__))


def build_model(model_args: ModelArguments, config, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    if model_args.model_name_or_path:
        dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            dtype=dtype,
            **low_cpu_mem_usage_kwargs(model_args),
        )
    else:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("training a new %s from scratch: %.2fM parameters", config.model_type, n_params / 1e6)

    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embeddings:  # a tokenizer with added tokens: give them rows
        model.resize_token_embeddings(len(tokenizer))
    name_causal_lm_loss(model)
    return model


def name_causal_lm_loss(model) -> None:
    """Name the loss a causal LM computes when its class name does not (``GPT2LMHeadModel``: ``loss_type`` None).

    Such a model falls back to ``ForCausalLMLoss`` anyway (with a "``loss_type=None`` ... unrecognized" warning),
    but the Trainer, seeing no ``ForCausalLM`` loss type, then counts every label for ``num_items_in_batch``
    instead of the B(T-1) shifted ones, and its ``loss``/``eval_loss`` come out (T-1)/T of the mean next-token
    loss (127/128 at block size 128). Naming the loss it computes makes both the mean next-token loss: the one
    upstream's run_clm.py reports and ``nerve probe --eval-loss`` reports.
    """
    if getattr(model, "loss_type", "") is None and not getattr(model.config, "is_encoder_decoder", False):
        model.loss_type = "ForCausalLM"


def low_cpu_mem_usage_kwargs(model_args: ModelArguments) -> dict:
    """``{"low_cpu_mem_usage": True}`` for transformers 4, which takes the flag; transformers 5 always loads
    that way and ignores it, so nothing is passed there."""
    import transformers

    if not model_args.low_cpu_mem_usage or int(transformers.__version__.split(".")[0]) >= 5:
        return {}
    return {"low_cpu_mem_usage": True}


def choose_block_size(data_args: DataTrainingArguments, tokenizer, config) -> int:
    limits = [tokenizer.model_max_length, 1024]
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context:
        limits.append(context)
    limit = min(limits)
    if data_args.block_size is None:
        return limit
    if data_args.block_size > limit:
        logger.warning("--block_size %d exceeds the model/tokenizer limit; using %d", data_args.block_size, limit)
        return limit
    return data_args.block_size


def prepare_datasets(
    data_args: DataTrainingArguments, model_args: ModelArguments, tokenizer, block_size: int, training_args
):
    """Raw text -> ``{"train": blocks, "validation": blocks}`` of ``block_size`` tokens, capped as asked."""
    from nerve_hf.data import load_raw_datasets, tokenize_and_group

    raw, text_column = load_raw_datasets(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        text_column=data_args.text_column_name,
        streaming=data_args.streaming,
        validation_split_percentage=data_args.validation_split_percentage,
        streaming_validation_docs=data_args.streaming_validation_docs,
        keep_linebreaks=data_args.keep_linebreaks,
        token=model_args.token,
        cache_dir=model_args.cache_dir,
        embedded_options={"max_bytes": data_args.embedded_max_bytes},
    )
    with training_args.main_process_first(desc="tokenizing"), cache_reuse(data_args.overwrite_cache):
        blocks = tokenize_and_group(
            raw, tokenizer, block_size, text_column=text_column, num_proc=data_args.preprocessing_num_workers
        )

    def cap(split, limit):
        if limit is None:
            return split
        if data_args.streaming:
            return split.take(limit)
        return split.select(range(min(limit, len(split))))

    train = cap(blocks["train"], data_args.max_train_samples)
    eval_limit = data_args.max_eval_samples
    if data_args.streaming and eval_limit is None:
        eval_limit = DEFAULT_STREAMING_EVAL_BLOCKS
        logger.warning("streaming: evaluating on the first %d blocks (set --max_eval_samples to change)", eval_limit)
    validation = cap(blocks["validation"], eval_limit)
    return train, validation


@contextmanager
def cache_reuse(overwrite_cache: bool):
    """``--overwrite_cache``: upstream passes ``load_from_cache_file=not overwrite_cache`` to ``Dataset.map``.
    ``nerve_hf.data.tokenize_and_group`` makes the map call, so caching is switched off around it instead: a
    ``map`` whose ``load_from_cache_file`` is unset then recomputes (the same effect)."""
    import datasets

    if not overwrite_cache or not datasets.is_caching_enabled():
        yield
        return
    datasets.disable_caching()
    try:
        yield
    finally:
        datasets.enable_caching()


ACCURACY_METRIC = Path(__file__).resolve().parents[1] / "metrics_local" / "accuracy"  # evaluate module, local
IGNORE_INDEX = -100  # labels the loss ignores


def preprocess_logits_for_metrics(logits, labels):
    """Upstream's: keep only the argmax token id of each position, so evaluation does not hold all logits."""
    if isinstance(logits, tuple):  # models that return past key values too
        logits = logits[0]
    return logits.argmax(dim=-1)


def token_accuracy_metrics(cache_dir: Optional[str] = None):
    """``compute_metrics`` of upstream's run_clm: next-token accuracy through ``evaluate``, from the
    ``accuracy`` module in ``metrics_local/`` (``evaluate.load("accuracy")`` would download it)."""
    import evaluate

    metric = evaluate.load(str(ACCURACY_METRIC), cache_dir=cache_dir)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        # preds are argmax ids shaped like the labels; position t predicts the label at t + 1
        labels = labels[:, 1:].reshape(-1)
        preds = preds[:, :-1].reshape(-1)
        keep = labels != IGNORE_INDEX
        return metric.compute(predictions=preds[keep], references=labels[keep])

    return compute_metrics


def nerve_callback(nerve_args):
    """The NerVE callback configured from the command line (imported only when ``--nerve`` is on)."""
    from dataclasses import asdict

    from nerve_hf import NerveCallback

    return NerveCallback(**asdict(nerve_args.config()))


_PER_FFN_KEY = re.compile(r"^(?:\w+_)?nerve/(?!mean/)[^/]+/")  # nerve/ffn.3/se_pre, eval_nerve/ffn.3/js


def console_view(logs: dict) -> dict:
    """A log record as the console shows it: NerVE values of single FFNs left out, layer means kept.

    >>> console_view({"loss": 2.5, "nerve/ffn.0/js": 0.1, "nerve/mean/js": 0.1, "eval_nerve/ffn.1/se_pre": 3.0})
    {'loss': 2.5, 'nerve/mean/js': 0.1}
    """
    return {key: value for key, value in logs.items() if not _PER_FFN_KEY.match(key)}


def show_nerve_means_on_console(trainer) -> None:
    """Swap the Trainer's console logger (progress bar or printer) for one that prints ``console_view``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class MeansOnConsole:  # put before a console callback: it prints console_view(logs)
        def on_log(self, args, state, control, logs=None, **kwargs):
            super().on_log(args, state, control, logs=console_view(logs or {}), **kwargs)

    class MeansProgressCallback(MeansOnConsole, ProgressCallback):
        pass

    class MeansPrinterCallback(MeansOnConsole, PrinterCallback):
        pass

    for original, replacement in ((ProgressCallback, MeansProgressCallback), (PrinterCallback, MeansPrinterCallback)):
        if trainer.pop_callback(original) is not None:
            trainer.add_callback(replacement)


def resolve_checkpoint(training_args) -> Optional[str]:
    """``--resume_from_checkpoint PATH``, or ``last``/``true`` for the newest checkpoint in ``--output_dir``."""
    from transformers.trainer_utils import get_last_checkpoint

    wanted = training_args.resume_from_checkpoint
    if wanted is None or str(wanted).lower() in ("false", "none", ""):
        return None
    if str(wanted).lower() in ("last", "true"):
        last = get_last_checkpoint(training_args.output_dir)
        if last is None:
            raise ArgumentError(f"--resume_from_checkpoint {wanted}: no checkpoint in {training_args.output_dir}")
        return last
    return wanted


def with_perplexity(metrics: dict, prefix: str = "eval") -> dict:
    """Add ``<prefix>_perplexity`` = exp(``<prefix>_loss``), the mean per-token cross-entropy."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 700 else float("inf")  # exp overflows past ~709
    return metrics


def evaluation_at_final_step(trainer) -> Optional[dict]:
    """Metrics of an evaluation the Trainer already ran on the final weights (``eval_steps`` divides
    ``max_steps``), so the last step is not evaluated, and measured, twice; None otherwise."""
    if trainer.args.load_best_model_at_end:  # the final weights are not the last step's
        return None
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") != trainer.state.global_step:
                return None
            return {k: v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"}
    return None


def main(argv: Optional[list[str]] = None) -> dict:
    """Run training and/or evaluation; returns the final metrics (``train_*`` and ``eval_*`` keys)."""
    model_args, data_args, training_args, nerve_args = parse_args(argv)
    setup_logging(training_args)
    logger.info(
        "process rank %s, device %s, n_gpu %s, distributed %s",
        training_args.process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value == "distributed",
    )
    if not (training_args.do_train or training_args.do_eval):
        logger.warning("nothing to do: pass --do_train and/or --do_eval")
        return {}
    if not training_args.do_train:
        logger.warning("evaluation only: pass --do_train to train (an --eval_strategy alone turns on --do_eval)")

    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ArgumentError("--streaming has no length: pass --max_steps")

    from transformers import Trainer, default_data_collator, set_seed

    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args, data_args)
    config = build_config(model_args, tokenizer)
    block_size = choose_block_size(data_args, tokenizer, config)
    train_dataset, eval_dataset = prepare_datasets(data_args, model_args, tokenizer, block_size, training_args)
    model = build_model(model_args, config, tokenizer)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,  # blocks are full: no padding, labels already present
        compute_metrics=token_accuracy_metrics(model_args.cache_dir) if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
        # given here, not added later: layers the model lacks are refused now, and eval-only runs are measured
        callbacks=[nerve_callback(nerve_args)] if nerve_args.nerve else None,
    )
    if nerve_args.nerve:
        show_nerve_means_on_console(trainer)

    metrics: dict = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resolve_checkpoint(training_args))
        trainer.save_model()  # also saves the tokenizer
        train_metrics = dict(result.metrics)
        if not data_args.streaming:
            train_metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)

    if training_args.do_eval:
        already = evaluation_at_final_step(trainer) if training_args.do_train else None
        if already is not None:
            logger.info(
                "the Trainer evaluated the final model at step %d: reusing that evaluation", trainer.state.global_step
            )
        eval_metrics = with_perplexity(already if already is not None else trainer.evaluate())
        eval_metrics["perplexity"] = eval_metrics["eval_perplexity"]  # upstream's key; eval_perplexity kept
        if not data_args.streaming:
            eval_metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", console_view(eval_metrics))
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    if training_args.do_train:
        finish_on_hub(trainer, model_args, data_args)
    return metrics


def finish_on_hub(trainer, model_args: ModelArguments, data_args: DataTrainingArguments) -> None:
    """Upstream's ending: ``--push_to_hub`` pushes the model with its card; otherwise the card is written
    to ``--output_dir``. Writing the card offline must not fail a finished run, so that failure only warns."""
    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
            kwargs["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
        else:
            kwargs["dataset"] = data_args.dataset_name
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**kwargs)
        return
    try:
        trainer.create_model_card(**kwargs)
    except Exception as error:  # e.g. the Hub is unreachable for a dataset's metadata
        logger.warning("no model card written: %s", error)


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: reported as one line, exit status 2."""
    from model_adapters import LayerRangeError
    from nerve_hf.errors import InputError
    from nerve_hf.tracking.tracker import MemoryBudgetError

    return ArgumentError, InputError, LayerRangeError, MemoryBudgetError


def cli(argv: Optional[list[str]] = None) -> int:
    """``python scripts/run_clm.py ...``: :func:`main`, with bad input as one line on stderr and exit 2."""
    try:
        main(argv)
    except _input_errors() as error:
        from nerve_hf.errors import one_line

        print(f"run_clm.py: error: {one_line(error)}", file=sys.stderr)
        return EXIT_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(cli())
