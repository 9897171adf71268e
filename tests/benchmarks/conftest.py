"""Fixtures of the benchmark tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def offline_cache_and_one_thread(tmp_path_factory):
    """Tokenizers trained into a temporary cache, the Hub offline; one torch thread (tiny models, shared CI
    cores). A module uses it with ``pytestmark = pytest.mark.usefixtures("offline_cache_and_one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NERVE_HF_CACHE", str(tmp_path_factory.mktemp("nerve_cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)
