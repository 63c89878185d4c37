"""Fixtures shared by the quantizer tests."""

import pytest
import torch

from tiny_bert import Tiny, correlated


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    calib = list(correlated(256, seed=3).split(16))  # 16 items of (16, 16, D)
    return model, calib, correlated(128, seed=4)  # held-out inputs
