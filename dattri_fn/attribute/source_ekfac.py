"""SOURCE's EK-FAC curvature checks and its pooled EK-FAC (:mod:`.source`), moved out of
:mod:`.source` to keep it within the house size (no behaviour change)."""

from __future__ import annotations

from torch import Tensor

from .._checks import _msg
from ..model import FunctionalModel


def _check_kronecker_only(model: FunctionalModel, params) -> None:
    """Refuse params outside EK-FAC's Kronecker layers in SOURCE's terms: its ``phi``/``decay``
    are functions of the Kronecker eigenvalues ``Lambda``, so it has no diagonal block (the
    factor builders' ``others=`` is no option of :func:`source`)."""
    from ..operators.kfac_layers import _select_parts

    outside = _select_parts("source", model.module, params, None, tied=True,
                            others="diagonal")[2]
    if outside:
        by: dict[str, list[str]] = {}
        for k, why in outside.items():
            by.setdefault(why, []).append(k)
        raise ValueError(_msg("source", "curvature", "'ekfac' on params that are all weights and "
                              "biases of nn.Linear, Conv1D or Conv2d layers (or a tied "
                              "Embedding/Linear weight K-FAC pools): SOURCE's phi and decay are "
                              "functions of the Kronecker eigenvalues, with no block for other "
                              "params", "params outside those layers (" + "; ".join(
                                  f"{w}: {ks}" for w, ks in by.items()) + ")",
                              "Record the run with those layers' params only "
                              "(functional_model(..., params=...)), or use curvature='gn' or "
                              "'hessian'."))


def _check_sampler(loss_fn) -> None:
    """Refuse ``fisher="true"`` (the default) for a loss_fn with no known sampler here, not at
    ``prepare`` as ``ekfac_factors(sampler=...)``: source has no ``sampler=`` (RU2 H2)."""
    from ..operators.kfac_fisher import fisher_losses

    try:
        fisher_losses("source", loss_fn, "true", 0, None)
    except ValueError as err:
        raise ValueError(_msg("source", "fisher", "'empirical' with curvature='ekfac' for this "
                              "loss_fn ('true' draws targets, by default only for "
                              "F.cross_entropy, nn.CrossEntropyLoss, cross_entropy_rows, "
                              "F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss and a "
                              "loss with its own .sample)", f"'true' with loss_fn "
                              f"{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}",
                              "Pass fisher='empirical', or set loss_fn.sample to a sampler "
                              "(output, target, generator) -> target (e.g. "
                              "dattri_fn.losses.sample_categorical for class labels and "
                              "softmax logits).")) from err


def _pooled_ekfac(model: FunctionalModel, group, train, fisher: str):
    """The EK-FAC of the checkpoints of ``group`` pooled (module docstring), as ``EKFACFactors``.

    Pooling over checkpoints is a sum over more examples, the reduction ``reduce`` of
    :func:`~dattri_fn.operators.kfac.ekfac_factors` performs across processes: one K-FAC pass
    per checkpoint gathers the factor sums, then each checkpoint's EK-FAC takes those pooled
    sums in place of its own K-FAC pass (so all share one eigenbasis) and keeps its own
    ``Lambda`` pass; the ``Lambda`` are averaged.
    """
    from ..operators.kfac import ekfac_factors, kfac_factors

    pooled: dict[str, Tensor] = {}
    total = [0]

    def gather(sums: dict, count: int):
        for key, v in sums.items():
            pooled[key] = v.clone() if key not in pooled else pooled[key] + v
        total[0] += count
        return sums, count

    for c in group:
        kfac_factors(model.module, model.loss_fn, c.params, train, fisher=fisher, reduce=gather,
                     others="error")

    def inject(sums: dict, count: int):
        # ekfac_factors reduces once per pass, its keys prefixed by pass: the K-FAC pass's
        # "A:"/"G:" sums (and its "R:" counts of moved layers) are replaced by the pooled ones;
        # the Lambda pass's "L:" (in the pooled basis) are this checkpoint's own.
        if all(key.startswith(("A:", "G:", "R:")) for key in sums):
            return {key: pooled[key] for key in sums}, total[0]
        return sums, count

    each = [ekfac_factors(model.module, model.loss_fn, c.params, train, fisher=fisher,
                          reduce=inject, others="error") for c in group]
    Lambda = {k: sum(f.Lambda[k] for f in each) / len(each) for k in each[0].Lambda}
    return each[0]._replace(Lambda=Lambda)
