"""A small three-block post-LN BERT encoder and correlated token inputs: the test model of the
block-wise and end-to-end quantizers (tests/compress/test_signround.py, test_scale_tuning.py)."""

import torch
from torch import nn

from mmkernels.models.minilm import BertLayer

D, HEADS, HID = 128, 4, 256


def correlated(m, seed):
    """``(m, 16, D)`` token rows: a full-rank latent with a decaying spectrum (``1 / sqrt(i)``)
    mixed into D channels, per-channel scales 0.2 to 3 (GPTQ gains ~4x over RTN here, as on
    MiniLM's layers; a low-rank latent would make GPTQ near exact)."""
    mix = torch.randn(D, D, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, 16, D, generator=g) * torch.arange(1, D + 1).pow(-0.5)
    return (z @ mix) * torch.linspace(0.2, 3.0, D)


class Tiny(nn.Module):
    """Three post-LN BERT layers (attention + GELU MLP, MiniLM's blocks at a smaller size)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([BertLayer(D, HEADS, HID, 1e-12) for _ in range(3)])

    def forward(self, x):
        mask_bias = torch.zeros(x.shape[0], 1, 1, x.shape[1])
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x
