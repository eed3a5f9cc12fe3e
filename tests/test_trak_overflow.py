"""Review R3 F4: with a narrow ``feature_dtype``, a finite per-example gradient that overflows at
the cast is named as such (feature_dtype, the params key, the call and its data argument), on
every feature path; not "NaN or inf in the per-example gradient" nor a singular kernel."""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute.trak import trak
from dattri_fn.model import functional_model
from dattri_fn.transforms.project import make_projector

F16 = torch.float16


def _problem(scale: float = 1e6):
    """A ReLU MLP; example 2 scaled so that its first-layer gradient (~scale) is finite in
    float32 but beyond float16's 65504."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(8, 3, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    bad = x.clone()
    bad[2] = bad[2].abs() * scale
    return functional_model(net, F.cross_entropy), x, bad, y


def _first_overflowing_key(fm, x, y) -> str:
    """The first params key whose autograd gradient at (x, y) is finite but inf in float16."""
    grads = torch.func.grad(fm.loss)(fm.params, (x, y))
    assert all(bool(torch.isfinite(v).all()) for v in grads.values())
    return next(k for k, v in grads.items() if not bool(torch.isfinite(v.to(F16)).all()))


_PATHS = {  # name -> trak settings, one per feature path that casts to feature_dtype
    "plan-projected": dict(proj_dim=4),
    "plan-raw": dict(proj_dim=None),
    "vmap-projected": dict(proj_dim=4, plain=True),
    "vmap-raw": dict(proj_dim=None, plain=True),
}
_FIX = r"\. Use a wider feature_dtype \(torch\.bfloat16 \(float32's range\) or torch\.float32\)"


def _method(fm, path: str, cache: bool = True, **extra):
    kw = dict(_PATHS.get(path, {}), **extra)
    out = fm.loss if kw.pop("plain", False) else fm
    return trak(out, damping=0.1, feature_dtype=F16, cache_features=cache, **kw)


@pytest.mark.parametrize("path", sorted(_PATHS))
def test_finite_gradient_overflowing_float16_names_feature_dtype_and_key(path):
    """|grad| ~ 1e6 > 65504 = max float16: prepare(train=...) and score(test=...) name
    feature_dtype=torch.float16, the first key that overflows, and the fix."""
    fm, x, bad, y = _problem()
    key = _first_overflowing_key(fm, bad[2], y[2])
    want = (r"expected examples whose per-example gradients fit in feature_dtype=torch\.float16 "
            rf"\(\|x\| <= 65504\), got a finite per-example gradient of '{key}' that overflows at "
            r"the cast \(inf in that dtype\)" + _FIX)
    with pytest.raises(ValueError, match=r"^trak\.prepare\(train=\.\.\.\): " + want):
        _method(fm, path).prepare(fm.params, (bad, y))
    m = _method(fm, path)
    st = m.prepare(fm.params, (x, y))
    with pytest.raises(ValueError, match=r"^trak\.score\(test=\.\.\.\): " + want):
        m.score(fm.params, st, None, (bad[1:4], y[1:4]))


@pytest.mark.parametrize("path", ["plan-projected", "vmap-projected", "vmap-raw"])
def test_overflow_in_train_rows_streamed_by_score_names_train(path):
    """Without a cache, score and self_score stream train: the overflow names train there."""
    fm, x, bad, y = _problem()
    m = _method(fm, path, cache=False)
    st = m.prepare(fm.params, (x, y))
    with pytest.raises(ValueError, match=r"^trak\.score\(train=\.\.\.\): expected examples whose "
                                         r"per-example gradients fit in feature_dtype=torch\.float16"):
        m.score(fm.params, st, (bad, y), (x[:2], y[:2]))
    with pytest.raises(ValueError, match=r"^trak\.self_score\(train=\.\.\.\): .*a finite "
                                         r"per-example gradient of '0\.weight' that overflows"):
        m.self_score(fm.params, st, (bad, y))


def test_kronecker_projection_names_the_gradient_that_overflows_float16():
    """The Kronecker path casts only P_out^T G P_in, but its error path forms the gradient's
    columns: a gradient beyond 65504 is named as on the other paths (review R6 F3: it said the
    projected features overflowed with 'every per-example gradient finite and within it')."""
    fm, x, bad, y = _problem()
    with pytest.raises(ValueError, match=r"^trak\.prepare\(train=\.\.\.\): expected examples whose "
                                         r"per-example gradients fit in feature_dtype=torch\.float16 "
                                         r"\(\|x\| <= 65504\), got a finite per-example gradient of "
                                         r"'0\.weight' that overflows at the cast" + ".*" + _FIX):
        trak(fm, damping=0.1, proj_dim=1, projection="kronecker",
             feature_dtype=F16).prepare(fm.params, (bad, y))


@pytest.mark.parametrize("plain", [False, True])
def test_projection_overflowing_float16_when_every_gradient_fits(plain):
    """max |grad| ~ 3.5e4 <= 65504 but |R^T grad| ~ 1.3e5 > 65504 (float64, the same R): the
    projected features are named, on the plan and the vmap path."""
    fm, x, _, y = _problem()
    x = x.clone()
    x[2] = x[2].abs() * 3e4
    grads = torch.func.grad(fm.loss)(fm.params, (x[2], y[2]))
    v = torch.cat([t.flatten() for t in grads.values()]).double()
    R = make_projector(v.numel(), proj_dim=1, kind="rademacher", seed=0).matrix(dtype=torch.float64)
    assert float(v.abs().max()) < 65504 < float((v @ R).abs().max())
    m = trak(fm.loss if plain else fm, damping=0.1, proj_dim=1, feature_dtype=F16)
    with pytest.raises(ValueError, match=r"^trak\.prepare\(train=\.\.\.\): expected examples whose "
                                         r"projected features fit in feature_dtype=torch\.float16 "
                                         r"\(\|x\| <= 65504\), got projected features that overflow"):
        m.prepare(fm.params, (x, y))


class _Log(nn.Module):
    def forward(self, x):
        return x.abs().log()  # -inf where x == 0: that example's gradient is NaN/inf


def test_nan_gradient_with_float16_features_is_still_a_nan():
    """A NaN/inf gradient (log at 0) keeps its message under float16 features: not an
    overflow, on the plan and vmap paths, projected or not."""
    torch.manual_seed(0)
    net = nn.Sequential(_Log(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    fm = functional_model(net, F.cross_entropy)
    _, x, _, y = _problem()
    bad = x.clone()
    bad[2, 0] = 0.0
    for out in (fm, fm.loss):
        for proj_dim in (4, None):
            # the plan's check refuses the NaN rows of its first examples (no dense warning
            # since 7ba14c5, review R4 F4); TRAK names the parameter, as without F16
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                with pytest.raises(ValueError, match=r"expected examples whose per-example "
                                   r"gradients are finite, got NaN or inf in the per-example "
                                   r"gradient of '1\.weight'\. Check those examples"):
                    trak(out, damping=0.1, feature_dtype=F16,
                         proj_dim=proj_dim).prepare(fm.params, (bad, y))


@pytest.mark.parametrize("case", ["cast", "projection"])
def test_error_path_forms_columns_in_small_blocks(monkeypatch, case):
    """The plan path looks for the cause one column block at a time (here 1 column: C b
    entries), never the [C, b, P] rows: the same key, or the projected features, named."""
    monkeypatch.setattr(importlib.import_module("dattri_fn.attribute.trak_errors"),
                        "_CAUSE_ENTRIES", 1)
    fm, x, bad, y = _problem()
    if case == "cast":
        key = _first_overflowing_key(fm, bad[2], y[2])
        want = rf"got a finite per-example gradient of '{key}' that overflows at the cast"
        m = trak(fm, damping=0.1, proj_dim=4, feature_dtype=F16)
    else:
        bad = x.clone()
        bad[2] = bad[2].abs() * 3e4  # every gradient fits float16, R^T g does not (test above)
        want = r"got projected features that overflow it"
        m = trak(fm, damping=0.1, proj_dim=1, feature_dtype=F16)
    with pytest.raises(ValueError, match=r"^trak\.prepare\(train=\.\.\.\): .*" + want):
        m.prepare(fm.params, (bad, y))


# Issue 18 (stop 25): a feature row whose squared norm overflows the dtype made prepare's kernel
# fail to factor, and prepare blamed damping. On that failure path only, the first such row is
# named as the training data's; a genuinely singular kernel still names damping.

_TRAIN_MSG = (r"^trak\.prepare\(train=\.\.\.\): expected examples whose per-example features "
              r"\(gradients\) are finite, with a squared norm finite in {} .*got a feature row "
              r"of example 2 whose squared norm is ")


def _huge(dtype, scale):
    """_problem in ``dtype``, example 2 scaled by ``scale`` there."""
    fm, x, _, y = _problem()
    bad = x.to(dtype)
    bad[2] = bad[2].abs() * scale
    return functional_model(fm.module.to(dtype), F.cross_entropy), bad, y


# (proj_dim, how train is given): the primal kernel from cached rows, and from a loader (Phi^T
# Phi accumulated batch by batch). The dual forms (d > n_train: a float64 [n, n] Gram whose
# overflowing row is one large diagonal entry) are read off that diagonal (tests below).
_FORMS = [(4, "list"), (4, "loader")]


def _train(x, y, how):
    if how == "list":
        return [(x[:4], y[:4]), (x[4:], y[4:])]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float64, 1e155)])
@pytest.mark.parametrize("proj,how", _FORMS)
def test_overflowing_train_row_names_train_and_the_example_not_damping(dtype, scale, proj, how):
    fm, x, y = _huge(dtype, scale)
    m = trak(fm, proj_dim=proj)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=_TRAIN_MSG.format(str(dtype)[6:])):
            m.prepare(fm.params, _train(x, y, how))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", ["list", "loader"])
def test_a_singular_kernel_on_tame_data_still_names_damping(dtype, how):
    """Every training example the same (Phi of rank 1, d = 4) and damping 0: singular, damping
    named; no row overflows."""
    fm, x, _, y = _problem()
    fm = functional_model(fm.module.to(dtype), F.cross_entropy)
    x, y = x[:1].to(dtype).expand(8, 3).clone(), y[:1].expand(8).clone()
    with pytest.raises(ValueError, match=r"^trak\.prepare\(damping=\.\.\.\): .*singular matrix "
                                         r"at checkpoints \[0\]"):
        trak(fm, proj_dim=4, damping=0.0).prepare(fm.params, _train(x, y, how))


def _wide(dtype, scale):
    """A wider ReLU MLP (3-16-3, d = P = 115 > n_train = 8) whose rows prepare keeps factored
    (``train_factors``), example 2 scaled by ``scale``."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)
    x, y = torch.randn(8, 3, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)
    x[2] = x[2].abs() * scale
    return functional_model(net, F.cross_entropy), x, y


@pytest.mark.parametrize("form", ["dual", "dual-dense", "factored"])
def test_overflowing_train_row_in_the_dual_forms_names_train(form):
    """float64 rows of squared norm ~1e310: the dual [n, n] Gram is inf and does not factor;
    the example is named (the dense rows, or the factored Gram's diagonal). float32 rows:
    test_float32_row_overflowing_in_the_dual_forms_names_train."""
    fm, x, y = (_wide if form == "factored" else _huge)(torch.float64, 1e155)
    m = trak(fm, proj_dim=16 if form == "dual" else None)
    fm0, x0, y0 = (_wide if form == "factored" else _huge)(torch.float64, 1.0)
    st = m.prepare(fm0.params, _train(x0, y0, "list"))  # the path taken on tame data
    assert (st.train_factors is not None) == (form == "factored") and st.kernel.shape[-1] != 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=_TRAIN_MSG.format("float64")):
            m.prepare(fm.params, _train(x, y, "list"))


@pytest.mark.parametrize("form", ["dual", "dual-dense", "factored"])
def test_float32_row_overflowing_in_the_dual_forms_names_train(form):
    """Stop 26 (engineer G's gap): a float32 row scaled by 1e20 has a squared norm ~1e40, finite
    in the dual form's float64 [n, n] Gram, which factors; prepare took it and its scores went
    unchecked. The Gram's diagonal (the rows' squared norms) over float32's max now names
    trak.prepare(train=...) and example 2, as the primal form does; tame data takes the same
    path (asserted) and is not refused."""
    fm, x, y = (_wide if form == "factored" else _huge)(torch.float32, 1e20)
    m = trak(fm, proj_dim=16 if form == "dual" else None)
    fm0, x0, y0 = (_wide if form == "factored" else _huge)(torch.float32, 1.0)
    st = m.prepare(fm0.params, _train(x0, y0, "list"))
    assert (st.train_factors is not None) == (form == "factored") and st.kernel.shape[-1] != 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=_TRAIN_MSG.format("float32")):
            m.prepare(fm.params, _train(x, y, "list"))


def test_dual_row_limit_is_the_rows_dtype_max():
    """The dual check reads the Gram's diagonal against float32's max for float32 rows: a row
    of squared norm just below it (scale 1e18: ~1e36) is taken, as before."""
    fm, x, y = _huge(torch.float32, 1e18)
    st = trak(fm, proj_dim=None).prepare(fm.params, _train(x, y, "list"))
    assert bool(torch.isfinite(st.kernel).all())


def test_dual_diagonal_names_the_row_where_the_norms_round_below(monkeypatch):
    """Should the rows' own squared norms round to within the limit where the Gram's diagonal
    did not, the diagonal names the row (here the norms are forced to 0)."""
    tk = importlib.import_module("dattri_fn.attribute.trak_kernel")
    monkeypatch.setattr(tk, "_row_norms2", lambda feats: torch.zeros(8, dtype=torch.float64))
    fm, x, y = _huge(torch.float32, 1e20)
    with pytest.raises(ValueError, match=_TRAIN_MSG.format("float32")):
        trak(fm, proj_dim=None).prepare(fm.params, _train(x, y, "list"))
