"""token_scores on a weight tied between a Linear head declared BEFORE its Embedding (the key is
'head.weight'): pooled over both uses like the embedding-first order, or refused with its bias
in params (before stop 20's review the head's own use was scored alone, silently)."""

import pytest
import torch
from test_kfac_diag import _grads, lm_loss
from test_kfac_review import HeadFirst, SharedLinear, _setup

from dattri_fn.attribute.tokens import token_scores
from dattri_fn.model import functional_model


def test_head_first_tied_weight_tokens_sum_to_the_full_gradient_score():
    """params = head.weight (both uses) + fc: sum_t s_itj = grad_i . p_j with grad_i the full
    per-example gradient by vmap(grad) (1e-10)."""
    model, params, (ids, labels) = _setup(HeadFirst, 3)
    fm = functional_model(model, lm_loss, params=lambda n: n != "head.bias")
    G = _grads(model, fm.params, ids, labels)
    feats = torch.randn(2, G.shape[1], generator=torch.Generator().manual_seed(0),
                        dtype=G.dtype)
    S = token_scores(fm, fm.params, (ids, labels), feats)
    ref = G @ feats.T
    torch.testing.assert_close(S.sum(1), ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.parametrize("cls, key", [(HeadFirst, "'head.weight'"), (SharedLinear, "'fc1.weight'")])
def test_unpoolable_tied_weight_of_a_linear_is_refused(cls, key):
    """A tied weight held by a Linear that cannot be pooled (the head's bias in params; two
    Linears sharing a weight) is refused, naming it, not scored from one use."""
    model, params, (ids, labels) = _setup(cls, 4)
    fm = functional_model(model, lm_loss, params=lambda n: not n.startswith("emb"))
    feats = torch.zeros(1, sum(v.numel() for v in fm.params.values()), dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"token_scores\(params=...\): expected tied weights "
                                         rf"read by one Embedding.*{key} shared by"):
        token_scores(fm, fm.params, (ids, labels), feats)
