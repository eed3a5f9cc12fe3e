"""Review RF's findings on stop 27's hardening: a FunctionalModel is no reference cycle (M3),
token_scores and per_sample_layer_grads refuse train-mode Dropout (M1), hvp's padding decision
reads a wrapped loss's module (M2, the model half), class ids of another integer dtype are named
as such (L1), a deep copy can be masked and a module's own Parameters in ``fixed`` stay bridged
(L2), a loss that samples is named by the method (L3), replaced models are warned once each for
good (L4)."""

import copy
import functools
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import dropout_members, grad_dot, tracin
from dattri_fn.attribute.tokens import token_scores
from dattri_fn.model import bridge_of, bridged, check_eval_module, marked_module
from dattri_fn.transforms.layer_grads import layer_plan, per_sample_layer_grads

F64 = torch.float64


def _mlp(drop=0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(drop), nn.Linear(6, 3)).to(F64)


def _data(n=8):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=F64), torch.randint(0, 3, (n,))


# M3 -------------------------------------------------------------------------------------------

def test_a_deleted_model_is_freed_without_the_garbage_collector():
    """The Bridge mark held the loss that holds the mark: every FunctionalModel was a cycle, its
    module alive until a gc pass. Mutation: the mark stores ``loss`` again (``loss._self =
    loss``, or a Bridge field) -> 3 modules alive."""
    alive = []
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(3):
            net = _mlp().eval()
            fm = functional_model(net, F.cross_entropy, params=["3"])
            alive.append(weakref.ref(net))
            del net, fm
        assert sum(r() is not None for r in alive) == 0
    finally:
        if was:
            gc.enable()


def test_cloudpickle_and_copy_stay_bridged_a_copied_mark_does_not():
    """Without the loss in the mark, bridge_of tells the closure by its code and by having no
    ``__wrapped__``. Mutations: the ``__code__`` check removed -> the __dict__ copy is taken;
    the ``__wrapped__`` check removed -> the update_wrapper target is taken."""
    cloudpickle = pytest.importorskip("cloudpickle")
    fm = functional_model(_mlp().eval(), F.cross_entropy, params=["3"])
    assert bridged(cloudpickle.loads(cloudpickle.dumps(fm)))
    assert bridged(copy.copy(fm)) and not bridged(copy.deepcopy(fm))

    def doubled(p, ex):
        return 2 * fm.loss(p, ex)

    doubled.__dict__.update(fm.loss.__dict__)  # the mark, without __wrapped__
    assert bridge_of(doubled) is None and not bridged(fm._replace(loss=doubled))
    other = functional_model(_mlp().eval(), F.cross_entropy)
    functools.update_wrapper(other.loss, fm.loss)  # fm's mark on other's closure
    assert bridge_of(other.loss) is None


# M1, M2 ---------------------------------------------------------------------------------------

def test_token_scores_refuses_train_mode_dropout():
    """Was refused blaming layers that mix examples. Mutation: the check_eval line removed."""
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(_mlp(0.5).train(), F.cross_entropy)
    P = sum(v.numel() for v in fm.params.values())
    with pytest.raises(ValueError, match=r"^token_scores\(model=\.\.\.\): expected a module in "
                                         r"eval mode.*Dropout in training mode at \['2'\]"):
        token_scores(fm, fm.params, _data(), torch.ones(1, P, dtype=F64))


def test_per_sample_layer_grads_refuses_train_mode_dropout():
    """Was per_sample_grad(loss=...)'s vmap refusal. Mutation: the check_eval line removed."""
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(_mlp(0.5).train(), F.cross_entropy)
    with pytest.raises(ValueError, match=r"^per_sample_layer_grads\(model=\.\.\.\): expected a "
                                         r"module in eval mode"):
        per_sample_layer_grads(fm, fm.params, _data())


def test_check_eval_module_names_the_module_argument():
    net = _mlp(0.5).train()
    with pytest.raises(ValueError, match=r"^kfac_factors\(module=\.\.\.\): expected a module in "
                                         r"eval mode.*\['2'\]\. Call module\.eval\(\) first\."):
        check_eval_module("kfac_factors", "module", net)
    check_eval_module("kfac_factors", "module", net.eval())


def test_marked_module_follows_a_wrapper():
    """hvp's padding decision: a functools.wraps copy of fm.loss names fm's module (rev-rev is
    right either way); bridge_of still refuses the wrapper."""
    net = _mlp().eval()
    fm = functional_model(net, F.cross_entropy)
    wrapped = functools.wraps(fm.loss)(lambda p, ex: fm.loss(p, ex))
    assert marked_module(fm.loss) is net and marked_module(wrapped) is net
    assert bridge_of(wrapped) is None and marked_module(lambda p, ex: 0) is None


# L1 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_class_ids_of_another_integer_dtype_ask_for_int64(dtype):
    """Was 'expected floating targets' (the headline read only is_floating_point). Mutation:
    want from ``target.is_floating_point()`` again -> 'floating targets'."""
    net = nn.Linear(4, 3).eval()
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,), dtype=dtype)
    with pytest.raises(TypeError, match=r"^grad_dot\(test=\.\.\.\): expected integer class ids "
                                        r"\(torch\.int64\) for the loss cross_entropy"):
        grad_dot(fm).score(fm.params, (), (x, y), (x[:2], y[:2]))


def test_a_dtype_clash_inside_the_loss_is_not_the_targets():
    """A bmm on two float dtypes inside loss_fn raises 'expected scalar type Float but found
    Double': the int64 targets are fine. Mutation: 'expected scalar type' matched alone ->
    'functional_model(loss_fn=...)' text naming the targets."""
    net = nn.Linear(4, 3).eval()

    def loss_fn(o, t):
        return torch.bmm(o[:, None], torch.ones(1, 3, 1, dtype=F64)).sum() + F.cross_entropy(o, t)

    fm = functional_model(net, loss_fn)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(Exception) as err:
        fm.loss(fm.params, (x[0], y[0]))
    assert "targets" not in str(err.value)


# L2 -------------------------------------------------------------------------------------------

def test_mask_of_a_deep_copy_scores_as_mask_of_the_model():
    """mask(copy.deepcopy(fm)) was refused as 'a replaced loss' since fixed is compared by
    storage; it is self-consistent (fixed = its module's values) and now rebuilt from its own
    module: torch.equal to mask(fm), bridged, factored, no warning. Mutation: _masked without
    the copy case -> ValueError."""
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(_mlp(0.3).train(), F.cross_entropy, params=["3"])
    fmc = copy.deepcopy(fm)
    x, y = _data(6)
    seen = []

    def run(m):
        ens = dropout_members(lambda mask: seen.append(mask(m)) or grad_dot(seen[-1]), n_masks=2)
        return ens.score(m.params, ens.prepare(m.params, (x, y)), (x, y), (x[:2], y[:2]))

    a = run(fm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = run(fmc)
    assert torch.equal(a, b)
    assert all(bridged(m) and layer_plan(m) is not None for m in seen[2:])


def test_mask_of_other_fixed_values_is_still_refused():
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(_mlp(0.3).train(), F.cross_entropy, params=["3"])
    fmc = copy.deepcopy(fm)
    fm2 = fmc._replace(fixed={k: 2 * v for k, v in fmc.fixed.items()})
    with pytest.raises(ValueError, match=r"^dropout_members\(build=\.\.\.\)"):
        dropout_members(lambda mask: grad_dot(mask(fm2)), n_masks=2)


def test_fixed_holding_the_modules_own_parameters_stays_bridged():
    """Mutation: same_storage with ``type(x) is Tensor`` again -> unbridged, dense, warned."""
    net = _mlp().eval()
    fm = functional_model(net, F.cross_entropy, params="3")
    own = dict(net.named_parameters())
    fm2 = fm._replace(fixed={k: own[k] for k in fm.fixed})
    assert bridged(fm2)
    train, test = _data(), _data(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S = grad_dot(fm2).score(fm.params, (), train, test)
    assert torch.equal(S, grad_dot(fm).score(fm.params, (), train, test))


# L3 -------------------------------------------------------------------------------------------

class _FDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, training=self.training))


@pytest.mark.parametrize("name, make", [("grad_dot", grad_dot),
                                        ("tracin", lambda m: tracin(m, lrs=[0.1]))])
def test_functional_dropout_is_named_by_the_method(name, make):
    """Was 'per_sample_grad(randomness=...)', an argument these methods do not take. Mutation:
    per_sample_grad_unchecked's default takes_randomness=True -> that text."""
    torch.manual_seed(0)
    fm = functional_model(_FDrop().to(F64).train(), F.cross_entropy)
    x, y = _data()
    m = make(fm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=rf"^{name}\(train=\.\.\.\): expected a loss that "
                                             r"draws no random numbers.*module\.eval\(\)"):
            m.prepare(fm.params, (x, y))


# L4 -------------------------------------------------------------------------------------------

def test_every_replaced_model_is_warned_even_after_others_are_freed():
    """The text carried id(loss): a freed loss's address is reused, so a later replaced model at
    the same call site was not warned (RF: 50 models, 2 warnings). Mutation: id() in the text
    again -> fewer than 20 warnings."""
    fm = functional_model(_mlp().eval(), F.cross_entropy)
    base = fm.loss

    def scaled(k):
        return lambda p, ex: k * base(p, ex)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("default")
        for k in range(20):
            grad_dot(fm._replace(loss=scaled(k + 1)))
    assert sum("is not the one functional_model built" in str(i.message) for i in w) == 20
