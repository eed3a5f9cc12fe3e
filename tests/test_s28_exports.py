"""The README's one-first-argument table lists ihvp_minres next to ihvp_cg: both are top-level
(review RU4 L2, stop 28)."""

import dattri_fn
from dattri_fn.solve import ihvp_minres


def test_ihvp_minres_is_exported_at_the_top_level():
    assert dattri_fn.ihvp_minres is ihvp_minres
    assert "ihvp_minres" in dattri_fn.__all__
