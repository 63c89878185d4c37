"""Token reduction: ToMe merging and score-based selection (pruning) primitives."""

from . import backends as _backends  # noqa: F401  (registers the backends)
from .api import (
    TomePlan,
    gather_tokens,
    merge_tokens,
    mergeable_a_tokens,
    select_tokens,
    tome_merge,
    tome_plan,
    tome_unmerge,
)

__all__ = [
    "TomePlan",
    "tome_plan",
    "tome_merge",
    "tome_unmerge",
    "select_tokens",
    "gather_tokens",
    "merge_tokens",
    "mergeable_a_tokens",
]
