"""Fixtures shared by several test files."""

import pytest


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache for local copies of Hub repositories (see tests/hub_copies.py)."""
    from hub_copies import HubCache

    return HubCache(tmp_path / "hub", monkeypatch)
