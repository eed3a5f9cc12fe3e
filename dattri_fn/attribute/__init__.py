"""Attribution methods as thin pipelines over the core transforms (see :mod:`.method`).

Every method: ``Method(prepare, score, self_score, name)``; scores ``[n_train, n_test]``,
positive = up-weighting the training example lowers the test loss (a proponent).
"""

from .gradsim import grad_cos, grad_dot, tracin
from .influence import InfluenceState, influence
from .logra import LoGraState, logra
from .method import Attributor, Method, stack_checkpoints
from .pipeline import TopK, collect, merge_topk, stream_scores, stream_self
from .representer import RepresenterState, representer
from .tokens import token_scores
from .trak import TRAKState, classification_margin, classification_weight, trak

__all__ = [
    "Attributor",
    "InfluenceState",
    "LoGraState",
    "Method",
    "RepresenterState",
    "TRAKState",
    "TopK",
    "classification_margin",
    "classification_weight",
    "collect",
    "grad_cos",
    "grad_dot",
    "influence",
    "logra",
    "merge_topk",
    "representer",
    "stack_checkpoints",
    "stream_scores",
    "stream_self",
    "token_scores",
    "tracin",
    "trak",
]
