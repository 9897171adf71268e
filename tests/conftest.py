"""Fixtures shared by several test files, and the check that process-launching tests carry their marker."""

import inspect
import os

import pytest
import torch

# DeepSpeed (in the test extra) picks its accelerator at first use, which any Trainer set-up reaches once it is
# installed; with no CUDA device it logs "Setting accelerator to CPU..." on stdout, into doctests comparing
# stdout. Naming the CPU accelerator up front (processes started by tests inherit it) is the same choice, quiet.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Scripts that tests start as processes: never imported by pytest (their module-level code is a run's set-up).
collect_ignore = ["workers"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache for local copies of Hub repositories (see tests/hub_copies.py)."""
    from hub_copies import HubCache

    return HubCache(tmp_path / "hub", monkeypatch)


# What a test (or one of its fixtures) calls when it starts torch.distributed processes.
LAUNCHES = ("torchrun(", "torch.distributed.run")


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    """Refuse a test that launches torch.distributed processes, itself or through a fixture, without the
    ``distributed`` marker: ``-m "not distributed"`` has to leave every such test out."""
    unmarked = []
    for item in items:
        function = getattr(item, "function", None)
        if function is None or item.get_closest_marker("distributed") is not None:
            continue
        fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        functions = [function] + [fixture.func for defs in fixtures.values() for fixture in defs]
        if any(launch in _source(f) for f in functions for launch in LAUNCHES):
            unmarked.append(item.nodeid)
    if unmarked:
        raise pytest.UsageError(f"tests that launch processes need @pytest.mark.distributed: {unmarked}")
