"""Shared fixtures: tiny model configs, so that every test builds models the same way."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig  # noqa: E402


@pytest.fixture
def tiny_model():
    """tiny_model(**overrides) -> a small fp32 GPT with fixed initial weights."""
    def build(**overrides):
        torch.manual_seed(0)
        args = dict(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
        args.update(overrides)
        return GPT(GPTConfig(**args))
    return build
