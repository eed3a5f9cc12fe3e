"""Regression tests for issue 15 (outside probe): bad or edge inputs get a clear error or the
right answer, never a silent wrong one or a raw torch error."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import LinOp, as_linop, fvp, gnvp, grad, hvp
from dattri_fn.attribute import grad_cos, merge_topk, tracin
from dattri_fn.attribute.trak import (
    classification_margin,
    classification_margin_loss,
    classification_weight,
    classification_weight_loss,
)
from dattri_fn.model import functional_model, load_checkpoints, load_params
from dattri_fn.tree import num_params, ravel_batched


# -- grad_cos: a zero gradient scores 0 on every path ------------------------------------
def _zero_grad_problem():
    """A bias-free linear classifier; example 2 has x = 0, so its gradient is exactly zero
    although the factored output gradient is not (0 * finite)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False))
    fm = functional_model(net, F.cross_entropy)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    x[2] = 0
    return fm, params, (x, y)


@pytest.mark.parametrize("path", ["model", "plain-loss", "projected"])
def test_grad_cos_zero_gradient_scores_zero_everywhere(path):
    """score, self_score and top_k agree: the zero-gradient row and column are 0, never NaN,
    and the other self-scores are 1."""
    fm, params, data = _zero_grad_problem()
    m = {"model": grad_cos(fm), "plain-loss": grad_cos(fm.loss),
         "projected": grad_cos(fm, proj_dim=8)}[path]
    S = m.score(params, (), data, data)
    assert not S.isnan().any()
    assert (S[2] == 0).all() and (S[:, 2] == 0).all()
    diag = m.self_score(params, (), data)
    assert diag[2] == 0 and not diag.isnan().any()
    if path != "projected":
        torch.testing.assert_close(diag[[0, 1, 3, 4, 5]], torch.ones(5))
    top = m.score(params, (), data, data, top_k=2)
    assert not top.values.isnan().any()
    assert top.values[0, 2] == 0  # the zero column ties at 0; nothing outranks it as NaN did


def test_grad_cos_model_and_plain_loss_agree_with_a_zero_gradient():
    fm, params, data = _zero_grad_problem()
    torch.testing.assert_close(grad_cos(fm).score(params, (), data, data),
                               grad_cos(fm.loss).score(params, (), data, data))


# -- tracin: lrs ---------------------------------------------------------------------------
def _tiny_regression():
    loss = lambda p, ex: ((ex[0] @ p["w"]) - ex[1]).pow(2)
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, generator=g)}
    return loss, params, (torch.randn(5, 3, generator=g), torch.randn(5, generator=g))


def test_tracin_accepts_a_generator_of_lrs_read_once():
    loss, params, data = _tiny_regression()
    ckpts = [params, {"w": params["w"] + 0.1}]
    m = tracin(loss, lrs=(lr for lr in [0.1, 0.2]))
    ref = tracin(loss, lrs=[0.1, 0.2]).score(ckpts, (), data, data)
    torch.testing.assert_close(m.score(ckpts, (), data, data), ref)
    torch.testing.assert_close(m.score(ckpts, (), data, data), ref)  # not exhausted


@pytest.mark.parametrize("lrs, exc, match", [
    ([], ValueError, r"tracin\(lrs=...\): expected one learning rate per checkpoint, got none\. "
                     r"TracIn sums over checkpoints"),
    ({0.1}, TypeError, r"tracin\(lrs=...\): expected a sequence of learning rates, one per "
                       r"checkpoint in order, got set"),
    ("0.1", TypeError, r"tracin\(lrs=...\): expected a sequence .* got str"),
    (["a"], TypeError, r"tracin\(lrs=...\): expected real numbers"),
    ([[0.1]], ValueError, r"tracin\(lrs=...\): expected a 1-d sequence"),
    ([math.inf], ValueError, r"tracin\(lrs=...\): expected a finite number > 0"),
])
def test_tracin_bad_lrs(lrs, exc, match):
    loss, _, _ = _tiny_regression()
    with pytest.raises(exc, match=match):
        tracin(loss, lrs=lrs)


def test_tracin_lrs_count_mismatch_names_the_checkpoints():
    loss, params, data = _tiny_regression()
    with pytest.raises(ValueError, match=r"tracin\(lrs=...\): expected 1 learning rates \(one per "
                                         r"checkpoint in params\), got 2\. Pass params as the list"):
        tracin(loss, lrs=[0.1, 0.2]).score(params, (), data, data)


# -- grad / hvp / fvp: a non-scalar per-example loss is refused ---------------------------
def _vector_loss(p, ex):
    return ex[0] * p["w"] - ex[1]  # [3] per example: not a loss


@pytest.mark.parametrize("func, call", [
    ("grad", lambda p, d: grad(_vector_loss, p, d)),
    ("hvp", lambda p, d: hvp(_vector_loss, p, d)(torch.ones(3))),
    ("hvp", lambda p, d: hvp(_vector_loss, p, d, mode="fwd-rev")(torch.ones(3))),
    ("fvp", lambda p, d: fvp(_vector_loss, p, d)(torch.ones(3))),
])
def test_non_scalar_loss_is_refused(func, call):
    params = {"w": torch.ones(3)}
    data = (torch.randn(5, 3), torch.randn(5, 1))
    with pytest.raises(ValueError, match=rf"^{func}\(loss=...\): expected a per-example function "
                                         rf".*returning a 0-d Tensor for ONE example"):
        call(params, data)


# -- LinOps: non-finite V, bad dim, wrong width -------------------------------------------
@pytest.mark.parametrize("factory", ["hvp", "gnvp", "fvp"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_curvature_linop_refuses_non_finite_V(factory, bad):
    loss, params, data = _tiny_regression()
    op = {"hvp": lambda: hvp(loss, params, data),
          "fvp": lambda: fvp(loss, params, data),
          "gnvp": lambda: gnvp(lambda p, ex: ex[0] @ p["w"],
                               lambda out, ex: (out - ex[1]).pow(2), params, data)}[factory]()
    V = torch.ones(2, 3)
    V[1, 0] = bad
    with pytest.raises(ValueError, match=rf"{factory}\(V=...\): expected finite values, "
                                         r"got NaN or inf"):
        op(V)
    with pytest.raises(ValueError, match=rf"{factory}\(V=...\): expected finite"):
        op(V[1])


def test_linop_finite_check_stays_out_of_torch_func_transforms():
    loss, params, data = _tiny_regression()
    H = hvp(loss, params, data)
    V = torch.randn(4, 3)
    torch.testing.assert_close(torch.func.vmap(H)(V), H(V))


@pytest.mark.parametrize("dim, exc, match", [
    (0, ValueError, r"as_linop\(dim=...\): expected an int >= 1, got 0"),
    (-2, ValueError, r"as_linop\(dim=...\): expected an int >= 1, got -2"),
    (3.0, TypeError, r"as_linop\(dim=...\): expected an int, got float"),
])
def test_as_linop_refuses_bad_dim(dim, exc, match):
    with pytest.raises(exc, match=match):
        as_linop(lambda V: V, dim=dim)


def test_linop_refuses_bad_dim_and_accepts_integer_types():
    with pytest.raises(ValueError, match=r"LinOp\(dim=...\): expected an int >= 1, got 0"):
        LinOp(lambda V: V, 0, torch.float32, "cpu")
    assert LinOp(lambda V: V, torch.tensor(3), torch.float32, "cpu").dim == 3


def test_as_linop_refuses_an_empty_matrix():
    with pytest.raises(ValueError, match=r"op: expected a square \[P, P\] matrix \(P >= 1\)"):
        as_linop(torch.zeros(0, 0))


def test_as_linop_callable_of_the_wrong_width_raises_at_call_naming_the_op():
    op = as_linop(lambda V: V[:, :2], dim=3, name="my_op")
    with pytest.raises(ValueError, match=r"my_op: expected the callable to map \[k, 3\] to "
                                         r"\[k, 3\], got \[1, 2\] for V of shape \[1, 3\]"):
        op(torch.ones(3))
    with pytest.raises(ValueError, match=r"my_op: expected the callable to map"):
        op.matmat(torch.ones(4, 3))  # solvers call matmat directly
    with pytest.raises(TypeError, match=r"my_op: expected the callable to return a Tensor, got list"):
        as_linop(lambda V: [1.0], dim=3, name="my_op")(torch.ones(3))


# -- classification_margin / classification_weight: labels ---------------------------------
def _logit_problem(labels):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g)}
    return params, (torch.randn(len(labels), 4, generator=g), torch.tensor(labels))


_forward = lambda p, ex: ex[0] @ p["w"]
_OUTPUTS = {"classification_margin": classification_margin,
            "classification_weight": classification_weight}


@pytest.mark.parametrize("func", sorted(_OUTPUTS))
@pytest.mark.parametrize("vmapped", [False, True])
def test_float_labels_are_refused(func, vmapped):
    fn = _OUTPUTS[func](_forward)
    params, (x, y) = _logit_problem([0.0, 1.5, 2.0])
    call = (lambda: torch.func.vmap(fn, in_dims=(None, 0))(params, (x, y))) if vmapped else \
        (lambda: fn(params, (x[1], y[1])))
    with pytest.raises(TypeError, match=rf"{func}\(example=...\): expected an integer class "
                                        r"label \(one per example\), got dtype torch.float32"):
        call()


@pytest.mark.parametrize("func", sorted(_OUTPUTS))
@pytest.mark.parametrize("label", [3, -1])
def test_out_of_range_labels_are_refused(func, label):
    fn = _OUTPUTS[func](_forward)
    params, (x, y) = _logit_problem([0, label, 2])
    with pytest.raises(ValueError, match=rf"{func}\(example=...\): expected class labels in "
                                         rf"\[0, 3\) for 3 logits, got label {label}\."):
        fn(params, (x[1], y[1]))
    with pytest.raises(ValueError, match=rf"{func}\(example=...\): expected class labels in "
                                         r"\[0, 3\) for 3 logits, got an out-of-range label"):
        torch.func.vmap(torch.func.grad(fn), in_dims=(None, 0))(params, (x, y))


def test_valid_labels_still_give_the_margin():
    params, (x, y) = _logit_problem([0, 1, 2])
    logits = x @ params["w"]
    ref = torch.stack([logits[i, y[i]] - torch.cat([logits[i, :y[i]], logits[i, y[i] + 1:]])
                       .logsumexp(0) for i in range(3)])
    m = torch.func.vmap(classification_margin(_forward), in_dims=(None, 0))(params, (x, y))
    torch.testing.assert_close(m, ref)
    torch.testing.assert_close(classification_margin_loss(logits, y), ref.mean())
    torch.testing.assert_close(classification_weight_loss(logits, y),
                               torch.sigmoid(-ref).mean())


@pytest.mark.parametrize("func", ["classification_margin_loss", "classification_weight_loss"])
def test_batch_loss_forms_refuse_bad_labels(func):
    fn = {"classification_margin_loss": classification_margin_loss,
          "classification_weight_loss": classification_weight_loss}[func]
    logits = torch.randn(3, 3)
    with pytest.raises(TypeError, match=rf"{func}\(labels=...\): expected integer class labels"):
        fn(logits, torch.tensor([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match=rf"{func}\(labels=...\): expected class labels in "
                                         r"\[0, 3\) for 3 logits, got label -1"):
        fn(logits, torch.tensor([0, -1, 2]))


# -- merge_topk -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"k": 0}, ValueError, r"merge_topk\(k=...\): expected an int >= 1, got 0"),
    ({"k": -2}, ValueError, r"merge_topk\(k=...\): expected an int >= 1, got -2"),
    ({"k": 1.5}, TypeError, r"merge_topk\(k=...\): expected an int, got float"),
    ({"block": torch.ones(4)}, ValueError, r"merge_topk\(block=...\): expected a 2-d tensor, "
                                           r"got shape \[4\]"),
    ({"block": [[1.0]]}, TypeError, r"merge_topk\(block=...\): expected a torch.Tensor, got list"),
    ({"offset": -1}, ValueError, r"merge_topk\(offset=...\): expected an int >= 0"),
])
def test_merge_topk_refuses_bad_arguments(kwargs, exc, match):
    args = {"best": None, "block": torch.ones(4, 2), "offset": 0, "k": 2, "largest": True}
    with pytest.raises(exc, match=match):
        merge_topk(**{**args, **kwargs})


def test_merge_topk_refuses_a_block_of_other_columns():
    best = merge_topk(None, torch.ones(3, 2), 0, 2, True)
    with pytest.raises(ValueError, match=r"merge_topk\(block=...\): expected 2 columns, as in "
                                         r"best, got shape \[3, 5\]"):
        merge_topk(best, torch.ones(3, 5), 3, 2, True)


@pytest.mark.parametrize("largest", [True, False])
def test_merge_topk_ranks_nan_last_streamed_or_not(largest):
    nan = math.nan
    S = torch.tensor([[1.0, nan], [nan, 2.0], [0.5, -math.inf], [3.0, 1.0], [nan, nan]])
    once = merge_topk(None, S, 0, 5, largest)
    best = None
    for a in range(0, 5, 2):
        best = merge_topk(best, S[a:a + 2], a, 5, largest)
    for top in (once, best):
        # every number first, in order; then the NaNs
        order0 = [3, 0, 2] if largest else [2, 0, 3]
        assert top.indices[:3, 0].tolist() == order0
        assert set(top.indices[3:, 0].tolist()) == {1, 4}
        assert top.values[3:, 0].isnan().all() and not top.values[:3, 0].isnan().any()
    top2 = merge_topk(None, S, 0, 2, largest)
    assert not top2.values.isnan().any()


# -- tree ------------------------------------------------------------------------------
@pytest.mark.parametrize("params, match", [
    ([torch.ones(3)], r"num_params\(params=...\): expected a dict\[str, Tensor\], got list"),
    ({"a": 3}, r"num_params\(params=...\): expected Tensor values, got int at key 'a'"),
])
def test_num_params_refuses_non_dicts(params, match):
    with pytest.raises(TypeError, match=match):
        num_params(params)


def test_ravel_batched_refuses_mismatched_batches():
    with pytest.raises(ValueError, match=r"ravel_batched\(tree=...\): expected every leaf to lead "
                                         r"with the batch dims \[3\] of 'a', got shapes "
                                         r"\{'b': \[4, 2\]\}"):
        ravel_batched({"a": torch.ones(3, 2), "b": torch.ones(4, 2)})
    with pytest.raises(ValueError, match=r"batch dims \[3, 2\] of 'a', got shapes \{'b': \[3\]\}"):
        ravel_batched({"a": torch.ones(3, 2), "b": torch.ones(3)}, batch_dims=2)
    with pytest.raises(TypeError, match=r"ravel_batched\(tree=...\): expected a non-empty "
                                        r"dict\[str, Tensor\], got list"):
        ravel_batched([torch.ones(3, 2)])
    assert ravel_batched({"a": torch.ones(3, 2), "b": torch.ones(3)}).shape == (3, 3)


# -- load_params: damaged checkpoints ---------------------------------------------------
def test_load_params_truncated_or_garbage_file(tmp_path):
    like = {"w": torch.zeros(3, 4)}
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(3, 4)}, good)
    data = good.read_bytes()
    for name, content in [("truncated.pt", data[: len(data) // 2]), ("empty.pt", b""),
                          ("garbage.pt", b"not a checkpoint")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"load_params\(source=...\): expected a checkpoint "
                                             rf"that torch.load\(weights_only=True\) reads, got "
                                             rf"'.*{name}' that fails .* may be truncated"):
            load_params(path, like)
        with pytest.raises(ValueError, match=r"load_checkpoints\(sources\[1\]=...\): "
                                             r"load_params\(source=...\): expected a checkpoint"):
            load_checkpoints([good, path], like)


def test_load_params_non_tensor_values(tmp_path):
    like = {"w": torch.zeros(3, 4)}
    with pytest.raises(TypeError, match=r"load_params\(source=...\): expected Tensor values, "
                                        r"got float at key 'w'"):
        load_params({"w": 3.0}, like)
    path = tmp_path / "list.pt"
    torch.save({"w": [1.0, 2.0]}, path)
    with pytest.raises(TypeError, match=r"load_params\(source=...\): expected Tensor values, "
                                        r"got list at key 'w'"):
        load_params(path, like)
    torch.save([torch.ones(2)], path)
    with pytest.raises(TypeError, match=r"load_params\(source=...\): expected a state dict "
                                        r"\(name -> Tensor\), got a list"):
        load_params(path, like)


def test_a_list_of_bare_tensor_shards_is_named_with_the_fix():
    """[x1, x2] of different lengths reads as ONE batch (x, y): the error says so and how to pass
    shards ([(x1,), (x2,)], each example then a 1-tuple), which then work (Grad-Dot)."""
    from dattri_fn.attribute import grad_dot

    w = {"w": torch.randn(3, dtype=torch.float64)}
    loss = lambda p, ex: (ex[0] @ p["w"]) ** 2  # an example is the 1-tuple (x,)
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sizes \[2, 4\]\. A list of Tensors is ONE batch .* "
                                         r"\[\(x1,\), \(x2,\)\]"):
        grad_dot(loss).score(w, (), [x1, x2], (x1,))
    S = grad_dot(loss).score(w, (), [(x1,), (x2,)], (x1,))
    assert S.shape == (6, 4)


def test_hypothesis_draws_do_not_depend_on_loaded_modules(tmp_path, monkeypatch):
    """One derandomized test draws the same examples before and after a local module full of
    integer and float literals is imported (Hypothesis mixes loaded modules' literals into its
    draws unless tests/conftest.py empties that pool)."""
    import importlib
    import sys

    from hypothesis import given, settings
    from hypothesis import strategies as st

    seen: list = []

    @settings(derandomize=True, database=None, max_examples=40)
    @given(n=st.integers(0, 10**6), f=st.floats(0.0, 1e6))
    def draw(n, f):
        seen.append((n, f))

    draw()
    before = list(seen)
    lines = [f"C{i} = {7919 * i + 13}\nF{i} = {i * 1234.5678 + 0.25}" for i in range(200)]
    (tmp_path / "dfn_literals_probe.py").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("dfn_literals_probe")
    try:
        seen.clear()
        draw()
    finally:
        sys.modules.pop("dfn_literals_probe", None)
    assert seen == before


# -- a loader readable once: the eager first-example checks must not consume its first batch ---
class _OnceDataset(torch.utils.data.IterableDataset):
    """One generator behind a Dataset: ``iter(loader) is not loader``, yet only one pass has rows."""

    def __init__(self, x, y):
        self.rows = ((x[i], y[i]) for i in range(len(x)))

    def __iter__(self):
        return self.rows


def _read_once(x, y):
    return torch.utils.data.DataLoader(_OnceDataset(x, y), batch_size=4)


def _once_problem(n=10):
    g = torch.Generator().manual_seed(0)
    params = {"W1": torch.randn(4, 3, generator=g, dtype=torch.float64),
              "W2": torch.randn(3, 4, generator=g, dtype=torch.float64)}
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return params, x, torch.randint(0, 3, (n,), generator=g)


def test_representer_and_dropout_ensemble_read_a_one_shot_loader_whole():
    """representer.prepare and dropout_ensemble.score on a loader readable once: every row, as
    from a list (the first batch is peeked for the eager check, then read once)."""
    from dattri_fn.attribute.ensemble import dropout_ensemble
    from dattri_fn.attribute.representer import representer

    params, x, y = _once_problem()
    feature = lambda p, z: torch.tanh(p["W1"] @ z[0])
    m = representer(feature, lambda p, h: p["W2"] @ h,
                    lambda o, t: F.cross_entropy(o[None], t[None]), l2=0.1)
    once, listed = m.prepare(params, _read_once(x, y)), m.prepare(params, [(x, y)])
    assert once.train_print is None  # a loader over another dataset is only counted at score
    for got, ref in zip(once[:3], listed[:3], strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    loss = lambda p, z: F.cross_entropy((p["W2"] @ F.dropout(feature(p, z), 0.3, training=True)
                                         )[None], z[1][None])
    ens = dropout_ensemble(loss, n_masks=2, seed=0)
    ref = ens.score(params, (), [(x, y)], (x[:2], y[:2]))
    torch.testing.assert_close(ens.score(params, (), _read_once(x, y), (x[:2], y[:2])), ref,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(ens.score(params, (), [(x, y)], _read_once(x[:2], y[:2])), ref,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(ens.self_score(params, (), _read_once(x, y)),
                               ens.self_score(params, (), [(x, y)]), rtol=0, atol=1e-12)


def test_meta_data_is_named():
    """Examples on the meta device: a TypeError naming the argument, not torch's '.item()'."""
    from dattri_fn._checks import batch_size

    with pytest.raises(TypeError, match=r"^f\(train=...\): expected tensors with data, got a "
                                        r"meta tensor"):
        batch_size("f", "train", (torch.ones(2, 3, device="meta"), torch.ones(2)))


def test_linop_refuses_rows_of_another_dtype_naming_v():
    """A float64 operator given float32 rows raises a TypeError naming V and the cast (no silent
    promotion, no raw matmul error), for a dense operator and an autodiff one alike; an operator
    that computes in its rows' dtype (follows_dtype, K-FAC/EK-FAC blocks) accepts them."""
    from dattri_fn.operators.curvature import hvp

    A = torch.eye(3, dtype=torch.float64)
    V = torch.ones(2, 3, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"dense\(V=...\): expected dtype torch.float64 \(the "
                                        r"operator's\), got torch.float32. Cast V"):
        as_linop(A, name="dense")(V)
    p = {"w": torch.ones(3, dtype=torch.float64)}
    op = hvp(lambda q, ex: (q["w"] * ex).pow(2).sum(), p, torch.ones(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"\(V=...\): expected dtype torch.float64"):
        op(V)

    class Follows(LinOp):
        __slots__ = ()
        follows_dtype = True

    out = Follows(lambda W: 2 * W, 3, torch.float64, "cpu", name="follows")(V)
    assert out.dtype == torch.float32 and torch.equal(out, 2 * V)
