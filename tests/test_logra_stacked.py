"""LoGra's damped eigenvalues computed once per stack of same-shape layers: the bits of the
layer-by-layer computation, the first failing layer named in layer order, ops not per layer."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dattri_fn._checks import _msg
from dattri_fn.attribute.logra_curvature import _eigvals


def _layer_by_layer(func, sums, n, damping):
    """The per-layer form (stop 25's code): Lambda + damping per layer, one check each."""
    eigvals = {}
    for ln, s in sums.items():
        lam = s / n
        mu = lam + (0.1 * lam.mean() if damping is None else damping)
        eigvals[ln] = mu
        floor = mu.abs().max() * torch.finfo(mu.dtype).eps if damping == 0 else 0
        if not bool((mu > floor).all()):
            raise ValueError(_msg(func, "damping", "a positive damping (or None) where the "
                                  f"projected eigenvalues of layer {ln!r} vanish (some "
                                  f"Lambda + damping <= {float(floor):.3g}"
                                  f"{', rounding level' if damping == 0 else ''})",
                                  f"damping={damping}"))
    return eigvals


def _sums(seed, dtype, shapes):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.rand(*s, generator=g, dtype=dtype) ** 2 * 10 ** (3 * i - 3)
            for i, s in enumerate(shapes)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("damping", [None, 1e-3, 0.0])
@pytest.mark.parametrize("seed", range(3))
def test_eigvals_equal_the_layer_by_layer_bits(dtype, damping, seed):
    """_eigvals(sums)[l] == (s_l / n + damping_l) layer by layer, torch.equal, in layer order."""
    sums = _sums(seed, dtype, [(8, 8), (4, 8), (8, 8), (16, 16), (4, 8), (8, 8), (1, 3)])
    got, want = _eigvals("f", sums, 500, damping), _layer_by_layer("f", sums, 500, damping)
    assert list(got) == list(want)
    for ln in want:
        assert got[ln].shape == want[ln].shape and torch.equal(got[ln], want[ln])


@pytest.mark.parametrize("damping", [None, 0.0])
def test_the_first_failing_layer_in_layer_order_is_named(damping):
    """Layers a (8x8) ok, b (4x4) and c (8x8) all zero: b is named, as layer by layer."""
    sums = {"a": torch.rand(8, 8) + 1, "b": torch.zeros(4, 4), "c": torch.zeros(8, 8)}
    with pytest.raises(ValueError, match="eigenvalues of layer 'b' vanish") as err:
        _eigvals("logra.prepare", sums, 10, damping)
    with pytest.raises(ValueError) as ref:
        _layer_by_layer("logra.prepare", sums, 10, damping)
    assert str(err.value) == str(ref.value)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_ops_do_not_grow_with_same_shape_layers():
    """Two or six 8x8 layers: the same ATen ops (one stack, one op each, one sync), not 7 a layer."""
    counts = []
    for L in (2, 6):
        sums = _sums(0, torch.float32, [(8, 8)] * L)
        with _Count() as c:
            _eigvals("f", sums, 500, None)
        counts.append(c.calls)
    assert counts[0] == counts[1] < 14, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("damping", [None, 1e-3])
def test_bits_equal_at_two_threads_above_and_at_the_grain(dtype, damping):
    """At 2 threads: 64x1024 layers (above torch's 32768-element grain, where a full mean is split
    over threads and a stack's row is not) keep the per-layer bits; 128x256 (at the grain) are
    still one stack (shared storage) with the per-layer bits (review RC H1, stop 26)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        differ = []
        for seed in range(3):
            sums = _sums(seed, dtype, [(64, 1024), (128, 256)] * 3)
            got, want = _eigvals("f", sums, 500, damping), _layer_by_layer("f", sums, 500, damping)
            differ += [(seed, ln) for ln in want if not torch.equal(got[ln], want[ln])]
        assert differ == []
        ptr = {ln: got[ln].untyped_storage().data_ptr() for ln in got}
        assert ptr["l1"] == ptr["l3"] == ptr["l5"]
        assert len({ptr["l0"], ptr["l2"], ptr["l4"], ptr["l1"]}) == 4
    finally:
        torch.set_num_threads(threads)


def test_a_layer_entry_pins_no_more_than_its_shape_group():
    """Review RC L1 (stop 26), documented in LoGraState: a layer's eigvals / eigvecs entry is a
    view whose storage holds its shape group's values and nothing else (the state's own bytes)."""
    from dattri_fn.attribute.logra import logra
    from dattri_fn.model import functional_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                              torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    fm = functional_model(net, torch.nn.functional.cross_entropy)
    data = (torch.randn(40, 6), torch.randint(0, 3, (40,)))
    st = logra(fm, proj_dim=4).prepare(fm.params, data)
    lam = st.eigvals
    assert len(lam) == 3
    for ln, v in lam.items():
        group = [u for u in lam.values() if u.shape == v.shape]
        assert v.untyped_storage().nbytes() == sum(u.nbytes for u in group), ln
    vecs = [q for pair in st.eigvecs.values() for q in pair]
    for q in vecs:
        group = [u for u in vecs if u.shape == q.shape]
        assert q.untyped_storage().nbytes() == sum(u.nbytes for u in group)
    # and a clone holds its layer alone
    one = next(iter(lam.values())).clone()
    assert one.untyped_storage().nbytes() == one.nbytes
