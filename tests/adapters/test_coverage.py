"""Every LM head class of the installed transformers: measured right against its own capture, or refused.

One case per ``*ForCausalLM`` / ``*ForConditionalGeneration`` / ``*ForMaskedLM`` class. A class that
builds from its shrunk config (``shrunk_models``) and runs on text is either measured right (every row an
up -> activation -> down FFN by its values, over the real tokens, with the float64 reference's metrics,
and no FFN that ran left out) or refused with a ``ValueError`` that says why (``coverage_check.check``).
Anything else fails: a new transformers release that adds a family shows up here. Classes that cannot be
built generically are skipped with the reason; ``EXPECTED`` lists the classes known to fail today, each
with its reason, as strict xfails: the change that fixes one must take it off the list.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.adapters import coverage_check, shrunk_models

MAX_PARAMETERS = 10_000_000  # bigger after shrinking: a sub-config the generic rules miss; skipped


# class name -> why it fails today (strict xfail: an XPASS fails, so a fix must remove its entry). Empty: every
# class builds and is measured right, refused with its reason (model_adapters/refusals.py), or skipped above.
EXPECTED: dict[str, str] = {}


def _build(name: str):
    """The class built once for real from its shrunk config (after a meta build that guards the size)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = shrunk_models.build(name)
    except Exception as error:  # noqa: BLE001 - any failure of a third-party constructor is a skip reason
        pytest.skip(f"does not build from a shrunk config: {type(error).__name__}: {str(error)[:200]}")
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMETERS:
        pytest.skip(f"{n:,} parameters after shrinking: a sub-config the generic rules do not shrink")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return shrunk_models.build(name)


def _runs_on_text(model) -> None:
    """Skip a class whose own forward (without the tracker) does not run on text alone."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**coverage_check.text_inputs(model))
    except Exception as error:  # noqa: BLE001 - the model itself cannot run on text alone
        pytest.skip(f"its forward does not run on input_ids alone: {type(error).__name__}: {str(error)[:200]}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (two wait on each other on a loaded machine, several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", shrunk_models.head_classes())
def test_measured_right_or_refused(name, request):
    if name in EXPECTED:
        request.applymarker(pytest.mark.xfail(reason=EXPECTED[name], strict=True, raises=(AssertionError, ValueError)))
    model = _build(name)
    try:
        outcome = coverage_check.check(model)  # one forward, under the tracker and the capture
    except AssertionError:
        raise
    except Exception:
        _runs_on_text(model)  # the forward fails without the tracker too: a skip, with its reason
        raise
    assert outcome.startswith(("measured", "refused"))
