"""``train_only``: train some parameters of a module and leave every other one untouched."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn


@contextmanager
def train_only(module: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Inside the ``with`` block, of ``module``'s parameters only ``params`` require gradients
    (the model's own weights get none, so they cannot change and cost no gradient memory); the
    others' ``requires_grad`` is restored on exit, also after an exception."""
    keep = {id(p) for p in params}
    frozen = [p for p in module.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


__all__ = ["train_only"]
