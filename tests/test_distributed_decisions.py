"""K-FAC/EK-FAC under a sharded ``reduce`` (review R1 F3): the decisions that move a layer out of
the Kronecker layers (the capture engine's refusal, the per-example check) are taken on each
shard's own data; they are now reduced with the K-FAC sums (``"R:<layer>"``), so every shard
sends the same keys to every call and drops the same layers. Before, a shard that refused
``enc`` sent ``A:head, G:head`` while the other sent ``A:enc, ...`` too (a real all-reduce hangs,
crashes or sums the wrong tensors). Two shards run in two threads whose ``reduce`` is a real
all-reduce (a barrier, then the sum of both shards' tensors in rank order), which refuses
differing keys or shapes."""

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_kfac_seqfirst import _batches, _problem
from torch import nn

from dattri_fn.operators import kfac_stats
from dattri_fn.operators.kfac import ekfac_factors, kfac_factors, kfac_tap

DT = torch.float64


# One rank computes at a time (the capture engine's torch function mode and autograd state are
# not meant to be shared by threads of one process; real ranks are processes): a rank holds the
# baton except while it waits in the all-reduce.
_BATON = threading.Lock()


def _all_reduce_pair():
    """``[reduce of rank 0, reduce of rank 1]`` summing both ranks' sums (rank order) and counts,
    and the key lists each rank sent, call by call; differing keys or shapes raise on both."""
    barrier = threading.Barrier(2, timeout=60)
    slots: list = [None, None]
    sent: list[list] = [[], []]

    def wait():  # the baton is given up while waiting for the other rank
        _BATON.release()
        barrier.wait()
        _BATON.acquire()

    def make(r):
        def reduce(sums, n):
            slots[r] = (sums, n)
            sent[r].append(sorted(sums))
            wait()
            (s0, n0), (s1, n1) = slots
            same = list(s0) == list(s1) and all(s0[k].shape == s1[k].shape for k in s0)
            out = {k: s0[k] + s1[k] for k in s0} if same else None
            wait()  # both have read the slots before the next call writes them
            if out is None:
                raise RuntimeError(f"all-reduce of differing sums: {sorted(s0)} vs {sorted(s1)}")
            return out, n0 + n1

        return reduce

    return [make(0), make(1)], sent


def _run_shards(fit, shards, **kw):
    """``fit(..., reduce=...)`` on each shard in its own thread: ``(results, sent keys, the
    warning texts of both ranks, sorted)`` (warnings are recorded process-wide: the warnings
    filter is not per thread)."""
    reduces, sent = _all_reduce_pair()
    out: list = [None, None]

    def run(r):
        with _BATON:
            try:
                out[r] = fit(*shards[r], reduce=reduces[r], **kw)
            except Exception as err:  # noqa: BLE001 (reported by the test)
                out[r] = err

    threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in (0, 1)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    return out, sent, sorted(str(x.message) for x in w)


def _assert_close_factors(got, ref):
    tol = dict(rtol=0, atol=1e-12)
    for field in ("A", "G", "Lambda", "diagonal"):
        if hasattr(ref, field):
            a, b = getattr(got, field), getattr(ref, field)
            assert list(a) == list(b)
            for k in b:
                scale = float(b[k].abs().max())
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol["atol"] * max(scale, 1))
    assert int(got.num_examples) == int(ref.num_examples)


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_shards_that_decide_differently_send_the_same_keys(fit):
    """Shard 0: batches of B = S (captured; the check moves the sequence-first 'enc'); shard 1:
    a batch of 3 (the capture engine refuses 'enc'). Both send the same keys to each call,
    both move 'enc', and the factors equal one process over all the data at 1e-12."""
    model, x, y = _problem(0, n=16)
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = [_batches(x[:8], y[:8], 4), _batches(x[8:12], y[8:12], 4) + [(x[12:15], y[12:15])]]
    shards = [(model, F.cross_entropy, params, d) for d in data]
    out, sent, warned = _run_shards(fit, shards)
    assert not any(isinstance(o, Exception) for o in out), out
    assert sent[0] == sent[1] and any(k.startswith("R:") for k in sent[0][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fit(model, F.cross_entropy, params, data[0] + data[1])
    assert len(warned) == 2 and all("'enc'" in w for w in warned)
    for r in (0, 1):
        assert "enc" not in (out[r].A if fit is kfac_factors else out[r].Lambda)
        _assert_close_factors(out[r], ref)


def test_a_layer_one_shard_moves_is_moved_on_every_shard(monkeypatch):
    """Only rank 0's check moves 'head' (rank 1's data would keep it): both ranks drop it, rank
    1's warning says another process moved it, and the factors equal one process whose check
    moves it (1e-12)."""
    model, x, y = _problem(0, n=16)
    params = {k: v.detach() for k, v in model.named_parameters()}
    real = kfac_stats.mismatched

    def on_rank0(*a, **k):
        bad = real(*a, **k)
        if threading.current_thread().name != "rank1":
            bad["head"] = "layer 'head': moved by this test's check"
        return bad

    monkeypatch.setattr(kfac_stats, "mismatched", on_rank0)
    data = [_batches(x[:8], y[:8], 4), _batches(x[8:], y[8:], 4)]
    shards = [(model, F.cross_entropy, params, d) for d in data]
    out, sent, warned = _run_shards(ekfac_factors, shards)
    assert not any(isinstance(o, Exception) for o in out), out
    assert sent[0] == sent[1]
    assert len(warned) == 2
    assert sum("moved by this test" in w for w in warned) == 1
    assert sum("another process" in w for w in warned) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ekfac_factors(model, F.cross_entropy, params, data[0] + data[1])
    for r in (0, 1):
        assert list(out[r].Lambda) == [] and "head.weight" in out[r].diagonal
        _assert_close_factors(out[r], ref)


def test_others_error_refuses_on_every_shard_after_the_reduce():
    """others='error' with a layer only rank 1's data refuses: both ranks raise the same named
    error after the one reduce (none waits for a call the other never makes)."""
    model, x, y = _problem(0, n=16)
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = [_batches(x[:8], y[:8], 4), _batches(x[8:12], y[8:12], 4) + [(x[12:15], y[12:15])]]
    shards = [(model, F.cross_entropy, params, d) for d in data]
    out, sent, _ = _run_shards(kfac_factors, shards, others="error")
    assert all(isinstance(o, ValueError) and "'enc'" in str(o) and "others=" in str(o)
               for o in out), out
    assert sent[0] == sent[1] and len(sent[0]) == 1


class _Kinds(nn.Module):
    """Conv2d (bias) -> Conv1D ([in, out] weight, bias) -> Linear (no bias) -> a head tied to an
    Embedding: every kind a shard may send zeros for."""

    def __init__(self):
        super().__init__()
        from test_capture import Conv1D

        gen = torch.Generator().manual_seed(4)
        self.conv = nn.Conv2d(2, 3, 2)
        self.c1d = Conv1D(5, 3, gen)
        self.lin = nn.Linear(5, 4, bias=False)
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x, ids):
        h = self.conv(x).mean((2, 3))  # [B, 3]
        h = torch.tanh(self.lin(torch.tanh(self.c1d(h[:, None, :])))) + self.emb(ids)
        return self.head(h).mean(1)


def test_zero_factors_have_the_factors_shapes():
    """The zeros a shard sends for a layer it dropped are shaped as that layer's A and G (conv2d
    with bias, Conv1D, a Linear without bias, a tied group in the [V, d] layout)."""
    torch.manual_seed(0)
    model = _Kinds().double().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=DT)
    ids = torch.randint(0, 6, (4, 1), generator=g)
    y = torch.randint(0, 6, (4,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = kfac_factors(model, F.cross_entropy, params, (x, ids, y))
    tapped = kfac_tap(model, params)
    state = {**params}
    assert sorted(f.A) == ["c1d", "conv", "emb", "lin"]
    for layer in f.A:
        for which, got in ((0, f.A[layer]), (1, f.G[layer])):
            zero = kfac_stats._zero_factor(tapped, layer, tuple(params), state, which)
            assert zero.shape == got.shape and not zero.any(), (layer, which)


@pytest.mark.parametrize("fit", [kfac_factors, ekfac_factors])
def test_a_shard_that_never_calls_a_layer_survives_the_diagonal_pass(fit):
    """Rank 0's sequences (T = 5) call fc2, rank 1's (T = 3) never do (review R1 stop 22 F1):
    both move fc2 to the diagonal block, both survive its pass (rank 1's autodiff rows of fc2
    are stride-0 zeros, which crashed it while rank 0 waited in the D: all-reduce), send the
    same keys, and the factors equal one process over all the data at 1e-12."""
    from test_kfac_uncalled import _Branch, _seeded, _seq

    g = torch.Generator().manual_seed(12)
    model = _seeded(_Branch(), 13)
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = [[_seq(g, 6, 5)], [_seq(g, 5, 3)]]
    out, sent, warned = _run_shards(fit, [(model, F.cross_entropy, params, d) for d in data])
    assert not any(isinstance(o, Exception) for o in out), out
    assert sent[0] == sent[1] and ["D:fc2.bias", "D:fc2.weight"] in sent[0]
    assert len(warned) == 2 and all("'fc2'" in w for w in warned)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fit(model, F.cross_entropy, params, data[0] + data[1])
    assert sorted(ref.diagonal) == ["fc2.bias", "fc2.weight"]
    assert float(ref.diagonal["fc2.weight"].abs().max()) > 1e-3
    for r in (0, 1):
        _assert_close_factors(out[r], ref)
