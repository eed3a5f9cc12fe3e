"""Attribution methods as thin pipelines over the core transforms (see :mod:`.method`).

Every method: ``Method(prepare, score, self_score, name)``; scores ``[n_train, n_test]``,
positive = up-weighting the training example lowers the test loss (a proponent).
"""

from .adamw_influence import adamw_influence
from .dvemb import DVEmbState, dvemb
from .ensemble import MembersState, dropout_ensemble, dropout_grads, dropout_mask, dropout_members
from .factgrass import FactGraSSState, factgrass
from .gradsim import GradSimState, grad_cos, grad_dot, tracin, tracin_cos
from .influence import InfluenceEnsembleState, InfluenceState, influence
from .knn_shapley import KNNShapleyState, knn_shapley, knn_shapley_values
from .less import less
from .logra import LoGraState, logra
from .magic import MagicState, MetaGradient, magic, metagradient
from .method import Attributor, Method, stack_checkpoints
from .pipeline import TopK, collect, merge_topk, stream_scores, stream_self
from .representer import RepresenterState, representer
from .source import SourceState, source
from .tokens import token_scores
from .trak import (
    TRAKState,
    classification_margin,
    classification_margin_loss,
    classification_weight,
    classification_weight_loss,
    trak,
)

__all__ = [
    "Attributor",
    "DVEmbState",
    "FactGraSSState",
    "GradSimState",
    "InfluenceEnsembleState",
    "InfluenceState",
    "KNNShapleyState",
    "LoGraState",
    "MagicState",
    "MembersState",
    "MetaGradient",
    "Method",
    "RepresenterState",
    "SourceState",
    "TRAKState",
    "TopK",
    "adamw_influence",
    "classification_margin",
    "classification_margin_loss",
    "classification_weight",
    "classification_weight_loss",
    "collect",
    "dropout_ensemble",
    "dropout_grads",
    "dropout_mask",
    "dropout_members",
    "dvemb",
    "factgrass",
    "grad_cos",
    "grad_dot",
    "influence",
    "knn_shapley",
    "knn_shapley_values",
    "less",
    "logra",
    "magic",
    "merge_topk",
    "metagradient",
    "representer",
    "source",
    "stack_checkpoints",
    "stream_scores",
    "stream_self",
    "token_scores",
    "tracin",
    "tracin_cos",
    "trak",
]
