"""Tests run offline: no model or dataset hub is reachable on the development machines or in CI.

One torch thread per test process: the tiny models gain little from a second thread, and on a 2-core
machine shared with anything else, two spinning OpenMP threads per process made runs up to 10× slower.
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    """Each test file builds the tiny models (seconds) in a private cache, never in the user's."""
    root = tmp_path_factory.mktemp("rdpo-cache")
    old = os.environ.get("RDPO_CACHE")
    os.environ["RDPO_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("RDPO_CACHE")
    else:
        os.environ["RDPO_CACHE"] = old
