"""Attribution methods as thin pipelines over the core transforms (see :mod:`.method`)."""

from .gradsim import grad_cos, grad_dot, tracin
from .influence import InfluenceState, influence
from .method import Method, stack_checkpoints
from .pipeline import TopK, stream_scores, stream_self

__all__ = [
    "InfluenceState",
    "Method",
    "TopK",
    "grad_cos",
    "grad_dot",
    "influence",
    "stack_checkpoints",
    "stream_scores",
    "stream_self",
    "tracin",
]
