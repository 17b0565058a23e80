"""Shared fixtures: the Llama-3 tokenizer, the shared data folder, small trained tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HANDBOOK = SHARED_DATA / "handbook-5lang.jsonl"


@pytest.fixture(scope="session")
def llama3_tokenizer():
    from zagreus.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture(scope="session")
def handbook_path() -> Path:
    if not HANDBOOK.is_file():
        pytest.skip(f"{HANDBOOK} not present")
    return HANDBOOK


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tiny shapes: on a shared 2-core machine two threads spin-wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
