"""grad and per_sample_grad against loops of torch.autograd.grad."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dattri_fn import grad, hvp, per_sample_grad
from problems import PROBLEMS, dense_per_sample_grads

problem_names = st.sampled_from(sorted(PROBLEMS))


@given(problem_names, st.integers(1, 12), st.integers(0, 2**16), st.sampled_from([None, 1, 3]))
def test_per_sample_grad_matches_autograd_loop(name, n, seed, chunk_size):
    """per_sample_grad(loss)[i] == autograd.grad(loss(params, x_i)) for every i and chunk size."""
    params, loss, batch = PROBLEMS[name](n=n, seed=seed)
    G = per_sample_grad(loss, params, batch, chunk_size=chunk_size)
    torch.testing.assert_close(G, dense_per_sample_grads(params, loss, batch), rtol=0, atol=1e-12)


@given(problem_names, st.integers(0, 2**16))
def test_chunked_equals_unchunked_and_dict_form(name, seed):
    """Chunked == unchunked exactly; the dict form ravels to the flat form."""
    params, loss, batch = PROBLEMS[name](n=7, seed=seed)
    full = per_sample_grad(loss, params, batch)
    torch.testing.assert_close(per_sample_grad(loss, params, batch, chunk_size=2), full,
                               rtol=0, atol=1e-14)
    tree = per_sample_grad(loss, params, batch, flat=False)
    assert list(tree) == list(params)
    torch.testing.assert_close(torch.cat([v.reshape(7, -1) for v in tree.values()], 1), full)


@given(problem_names, st.integers(0, 2**16), st.integers(1, 6))
def test_grad_is_mean_of_per_sample_over_batches(name, seed, split):
    """grad over a list of batches == mean_i g_i over the concatenation (weighted by batch size)."""
    params, loss, (x, y) = PROBLEMS[name](n=9, seed=seed)
    batches = [(x[:split], y[:split]), (x[split:], y[split:])]
    expected = dense_per_sample_grads(params, loss, (x, y)).mean(0)
    torch.testing.assert_close(grad(loss, params, batches), expected, rtol=0, atol=1e-12)
    tree = grad(loss, params, (x, y), flat=False)
    assert list(tree) == list(params)


def test_device_and_dtype_follow_params(device):
    """Results live on the params' device and dtype; a CPU batch is moved to it."""
    params, loss, batch = PROBLEMS["logistic"](n=4, device=device)
    G = per_sample_grad(loss, params, tuple(t.cpu() for t in batch))
    assert G.device.type == device.type and G.dtype == torch.float64


def test_bad_inputs_name_the_argument():
    """Empty batch, mismatched leading dims, NaN input, bad chunk_size: clear errors."""
    params, loss, (x, y) = PROBLEMS["linear"](n=4)
    with pytest.raises(ValueError, match=r"per_sample_grad\(batch=...\): expected a non-empty"):
        per_sample_grad(loss, params, (x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"per_sample_grad\(batch=...\): expected one leading"):
        per_sample_grad(loss, params, (x, y[:3]))
    with pytest.raises(ValueError, match=r"per_sample_grad\(batch=...\): expected finite"):
        per_sample_grad(loss, params, (x * float("nan"), y))
    with pytest.raises(ValueError, match=r"per_sample_grad\(chunk_size=...\): expected an int >= 1"):
        per_sample_grad(loss, params, (x, y), chunk_size=0)
    with pytest.raises(TypeError, match=r"per_sample_grad\(params=...\)"):
        per_sample_grad(loss, [1, 2], (x, y))
    with pytest.raises(TypeError, match=r"grad\(data=...\): expected a re-iterable"):
        grad(loss, params, ((x, y) for _ in range(2)))


# -- losses that sample (dropout) under the transforms, with explicit seeds ----------------
def _dropout_problem():
    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(4, 3, generator=g, dtype=torch.float64),
              "w2": torch.randn(2, 4, generator=g, dtype=torch.float64)}
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    x[1], y[1] = x[0], y[0]  # a duplicated example: same draw under "same", not "different"

    def loss(p, ex):
        h = torch.nn.functional.dropout(torch.tanh(p["w1"] @ ex[0]), 0.5, training=True)
        return torch.nn.functional.cross_entropy((p["w2"] @ h)[None], ex[1][None])

    return params, loss, (x, y)


def test_per_sample_grad_of_a_sampling_loss_is_seeded_and_named():
    """randomness='error' names the option; 'different' + seed: the same draws on every call,
    other seeds other draws, the caller's RNG untouched; 'same' gives a duplicated example the
    same gradient, 'different' (almost surely) not."""
    params, loss, batch = _dropout_problem()
    with pytest.raises(ValueError, match=r"per_sample_grad\(randomness=...\): expected "
                                         r"randomness='different'"):
        per_sample_grad(loss, params, batch)
    with pytest.raises(ValueError, match=r"per_sample_grad\(randomness=...\): expected one of"):
        per_sample_grad(loss, params, batch, randomness="sometimes")
    state = torch.get_rng_state()
    G = per_sample_grad(loss, params, batch, randomness="different", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(G, per_sample_grad(loss, params, batch, randomness="different", seed=3))
    assert not torch.equal(G, per_sample_grad(loss, params, batch, randomness="different",
                                              seed=4))
    assert not torch.equal(G[0], G[1])
    S = per_sample_grad(loss, params, batch, randomness="same", seed=3)
    assert torch.equal(S[0], S[1])


def test_hvp_of_a_sampling_loss_is_one_linear_symmetric_map():
    """hvp(randomness='different', seed=s) replays the same draws per call: H(aV + bW) =
    aHV + bHW, <u, Hv> = <Hu, v>, and two calls agree exactly; 'error' is named."""
    params, loss, batch = _dropout_problem()
    op = hvp(loss, params, batch, randomness="different", seed=5)
    g = torch.Generator().manual_seed(1)
    V, W = (torch.randn(3, op.dim, generator=g, dtype=torch.float64) for _ in range(2))
    HV = op(V)
    assert torch.equal(HV, op(V))
    torch.testing.assert_close(op(2.0 * V - 3.0 * W), 2.0 * HV - 3.0 * op(W), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(V @ op(W).T, op(V) @ W.T, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"hvp\(randomness=...\): expected randomness="):
        hvp(loss, params, batch)(V)
