"""Shared fixtures. Tests that use ../shared/corpus skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# No per-example deadline: CI shares two cores, and a slow example is not a failure. Per-test @settings still
# choose max_examples.
settings.register_profile("peft-surgery", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("peft-surgery")

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("PEFT_SURGERY_CORPUS", REPO.parent / "shared" / "corpus"))
FIXTURES = REPO / "fixtures"

# Keep tests deterministic and light on a 2-core machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus_path(name: str) -> Path:
    """Path to a corpus entry, or skip the test when ../shared/corpus (or the entry) is absent."""
    p = CORPUS / name
    if not p.exists():
        pytest.skip(f"corpus entry {name} not available (../shared/corpus absent)")
    return p


@pytest.fixture
def corpus():
    return corpus_path


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return "cuda"
