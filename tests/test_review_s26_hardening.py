"""Stop 26's review findings (issue 14), each refused or made consistent: a FunctionalModel with
other ``fixed`` tensors is not bridged (RG M1), a train-mode Dropout model is refused by name
(RU M3), a target of the wrong dtype names the loss and the dtype (RU L1), token_scores refuses a
replaced loss (RG L1), layer_plan's warning points at the user's line and warns every replaced
model (RG L3), TRAK's example_ok reads the bridge mark (not closure names), LiSSA's scale is
refused as influence(scale=...) (RH L2)."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_replaced_loss import _scores as _score
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import dropout_members, grad_dot, influence, tracin
from dattri_fn.attribute.outputs import classification_margin_loss
from dattri_fn.attribute.tokens import token_scores
from dattri_fn.model import bridge_of, bridged
from dattri_fn.transforms.layer_grads import layer_plan

F64 = torch.float64


def _setup(params=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(F64)
    x, y = torch.randn(12, 5, dtype=F64), torch.randint(0, 3, (12,))
    return functional_model(net, F.cross_entropy, params=params), (x, y), (x[:4], y[:4])




# RG M1 ----------------------------------------------------------------------------------------

def test_other_fixed_tensors_are_not_bridged_and_score_the_loss():
    """fm._replace(fixed=<other values>) (a frozen layer of another checkpoint): fm.loss reads the
    closure's fixed, so the model is not bridged and grad_dot(fm2) equals grad_dot(fm2.loss)
    (it differed by 3.43 when the capture read fm2.fixed). Mutation: bridged without the fixed
    comparison -> bridged(fm2) True, scores differ."""
    fm, train, test = _setup(params="2")
    fm2 = fm._replace(fixed={k: 3 * v for k, v in fm.fixed.items()})
    assert not bridged(fm2)
    a, warned = _score(grad_dot, fm2, fm.params, train, test)
    b, _ = _score(grad_dot, fm2.loss, fm.params, train, test)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert any("is not the one functional_model built" in t for t in warned)


def test_same_storage_fixed_stays_bridged():
    """A new dict, new tensor objects over the same storage (detach, what dropout_masks
    rebinds) or another key order: still the tensors the closure reads, so still bridged."""
    fm, _, _ = _setup(params="2")
    assert bridged(fm._replace(fixed=dict(fm.fixed)))
    assert bridged(fm._replace(fixed={k: v.detach() for k, v in fm.fixed.items()}))
    assert bridged(fm._replace(fixed=dict(reversed(list(fm.fixed.items())))))
    assert not bridged(fm._replace(fixed={k: v.clone() for k, v in fm.fixed.items()}))
    assert not bridged(fm._replace(fixed={k: v[:1] for k, v in fm.fixed.items()}))
    assert not bridged(fm._replace(fixed={}))


def test_a_wrapper_copying_the_mark_is_not_bridged():
    """functools.wraps copies the closure's __dict__ (its _bridge mark) onto another function:
    bridge_of reads the closure's own code and no ``__wrapped__``, so the wrapper is not
    functional_model's loss. Mutation: bridge_of without both checks -> bridged True."""
    fm, _, _ = _setup()

    @functools.wraps(fm.loss)
    def doubled(p, ex):
        return 2 * fm.loss(p, ex)

    assert bridge_of(fm.loss) is not None and bridge_of(doubled) is None
    assert not bridged(fm._replace(loss=doubled))


def test_dropout_members_of_a_model_stay_bridged_and_factored():
    """mask(fm) rebinds fixed to the same storage: bridged, so its capture plan is built."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(F64)
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(net.train(), F.cross_entropy, params=["3"])
    seen = []
    ens = dropout_members(lambda mask: seen.append(mask(fm)) or grad_dot(seen[-1]), n_masks=2)
    assert len(seen) == 2 and all(bridged(m) for m in seen)
    assert all(layer_plan(m) is not None for m in seen)
    x, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 3, (6,))
    S = ens.score(fm.params, ens.prepare(fm.params, (x, y)), (x, y), (x[:2], y[:2]))
    assert S.shape == (6, 2) and torch.isfinite(S).all()


# RU M3 ----------------------------------------------------------------------------------------

def _train_mode_dropout(p=0.5):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Dropout(p), nn.Linear(5, 1)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return functional_model(net, lambda o, t: F.binary_cross_entropy_with_logits(
            o.squeeze(-1), t))


@pytest.mark.parametrize("make", [lambda m: grad_dot(m), lambda m: tracin(m, lrs=[0.1]),
                                  lambda m: grad_dot(lambda p, z: 0.0, target=m),
                                  lambda m: influence(m, solver="ekfac"),
                                  lambda m: influence(m, solver="cg")])
def test_train_mode_dropout_is_refused_by_name(make):
    """Was: two layer_grads warnings blaming non-batch-first layers, then
    per_sample_grad(randomness=...), an argument grad_dot does not take (EK-FAC ran silently).
    Mutation: the check_eval calls removed -> no ValueError at construction."""
    fm = _train_mode_dropout()
    with pytest.raises(ValueError, match=r"^(grad_dot|tracin|influence)\((loss|target)=\.\.\.\): "
                                         r"expected a module in eval mode.*Dropout in training "
                                         r"mode at \['1'\]\. Call module\.eval\(\).*"
                                         r"dropout_members"):
        make(fm)


def test_eval_or_inactive_dropout_passes():
    fm = _train_mode_dropout(p=0.0)
    grad_dot(fm)
    fm = _train_mode_dropout()
    fm.module.eval()
    grad_dot(fm)


# RU L1 ----------------------------------------------------------------------------------------

def _bce():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).eval()
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16, 1))
    return functional_model(net, F.binary_cross_entropy_with_logits), x, y


def test_integer_labels_of_a_bce_loss_name_the_loss_and_dtype():
    """BCE-with-logits on int64 labels raised torch's bare 'result type Float can't be cast to
    the desired output type Long'. Mutation: the try in layer_grads_paths._row_losses removed
    -> that RuntimeError again."""
    fm, x, y = _bce()
    with pytest.raises(TypeError, match=r"^grad_dot\(test=\.\.\.\): expected floating targets "
                                        r"\(torch\.float32, the output's dtype\) for the loss "
                                        r"binary_cross_entropy_with_logits, got torch\.int64 "
                                        r"targets.*y\.float\(\)"):
        grad_dot(fm).score(fm.params, (), (x, y), (x[:2], y[:2]))
    with pytest.raises(TypeError, match=r"^functional_model\(loss_fn=\.\.\.\): expected floating "
                                        r"targets"):
        fm.loss(fm.params, (x[0], y[0]))
    S = grad_dot(fm).score(fm.params, (), (x, y.float()), (x[:2], y[:2].float()))
    assert S.shape == (16, 2)


def test_float_class_ids_name_the_integer_dtype():
    fm, (x, y), _ = _setup()
    with pytest.raises(TypeError, match=r"^grad_dot\(test=\.\.\.\): expected integer class ids "
                                        r"\(torch\.int64\) for the loss cross_entropy"):
        grad_dot(fm).score(fm.params, (), (x, y.to(F64)), (x[:2], y[:2].to(F64)))


# RG L1, L3 ------------------------------------------------------------------------------------

def test_token_scores_refuses_a_replaced_loss():
    """Was refused only by its autograd self-check, blaming sequence-first layers.
    Mutation: the check_bridged line removed -> that other message."""
    fm, train, _ = _setup()
    base = fm.loss
    fm2 = fm._replace(loss=lambda p, ex: 2 * base(p, ex))
    P = sum(v.numel() for v in fm.params.values())
    with pytest.raises(ValueError, match=r"^token_scores\(model=\.\.\.\): expected a "
                                         r"FunctionalModel whose loss is functional_model's own"):
        token_scores(fm2, fm.params, train, torch.zeros(2, P, dtype=F64))


def test_layer_plan_warning_points_at_the_user_and_names_each_model():
    """Under Python's default filter, two replaced models built on one line of user code are both
    warned (the text names the loss), once each, at this file's line (not method.py's).
    Mutations: stacklevel=2 -> the filename is the library's; the fixed text -> one warning."""
    fm, _, _ = _setup()
    base = fm.loss
    models = [fm._replace(loss=lambda p, ex: 2 * base(p, ex)),
              fm._replace(loss=lambda p, ex: 3 * base(p, ex))]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("default")
        for m in (models[0], models[1], models[0]):
            grad_dot(m)
    mine = [i for i in w if "is not the one functional_model built" in str(i.message)]
    assert len(mine) == 2
    assert all(i.filename == __file__ for i in mine)
    assert len({str(i.message) for i in mine}) == 2


# trak_mlp.example_ok, RH L2 -------------------------------------------------------------------

def test_example_ok_reads_the_bridge_mark():
    """example_ok certifies functional_model's own margin closure (its Bridge), and nothing that
    only copied the mark. Mutation: bridge_of without the ``__code__`` and ``__wrapped__``
    checks -> True for the wrapper."""
    import importlib

    trak_mlp = importlib.import_module("dattri_fn.attribute.trak_mlp")
    torch.manual_seed(0)
    fm = functional_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64),
                          classification_margin_loss)
    batch = (torch.randn(5, 3, dtype=F64), torch.randint(0, 3, (5,)))
    assert trak_mlp.example_ok(layer_plan(fm), fm.loss, fm.params, batch)
    wrapped = functools.wraps(fm.loss)(lambda p, ex: fm.loss(p, ex))
    plan = layer_plan(fm)._replace(model=fm._replace(loss=wrapped))
    assert not trak_mlp.example_ok(plan, wrapped, fm.params, batch)


@pytest.mark.parametrize("scale", [-1.0, 0.0, float("inf")])
def test_lissa_scale_refused_as_influence_scale(scale):
    """Was refused at prepare as ihvp_lissa(scale=...). Mutation: the check removed -> no error
    at construction."""
    fm, _, _ = _setup()
    with pytest.raises(ValueError, match=r"^influence\(scale=\.\.\.\): expected a finite number"):
        influence(fm, solver="lissa", scale=scale)


def test_mask_of_a_replaced_model_is_refused():
    """mask(fm2) rebuilt the model from module and loss_fn: a replaced loss was dropped with no
    warning (stop 27: mask(fm2) scored as mask(fm), 7.08 off mask(fm2.loss) against max 9.44).
    Mutation: the check_bridged line in dropout_masks._masked removed -> no error."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(F64)
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(net.train(), F.cross_entropy)
    base = fm.loss
    fm2 = fm._replace(loss=lambda p, ex: 2 * base(p, ex))
    with pytest.raises(ValueError, match=r"^dropout_members\(build=\.\.\.\): expected a "
                                         r"FunctionalModel whose loss is functional_model's own"
                                         r".*mask\(model\.loss\)"):
        dropout_members(lambda mask: grad_dot(mask(fm2)), n_masks=2)
    dropout_members(lambda mask: grad_dot(mask(fm2.loss)), n_masks=2)  # the loss itself: fine
