"""Shared test set-up (the `gpu` skip lives in the repository's conftest.py, shared with benchmarks/)."""
import os
import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture
def seed():
    """A fresh seed per test (printed on failure), so inputs are new every run."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    random.seed(s)
    print(f"seed = {s}")
    return s


@pytest.fixture
def wikitext_path():
    path = WIKITEXT / "wiki.valid.tokens"
    if not path.exists():
        pytest.skip(f"WikiText-2 is not at {path} (it lives in ../shared/data, outside the repo)")
    return path
