"""The K-FAC split (stop 18) moved code from ``dattri_fn.operators.kfac`` into five modules;
every name, private helpers included (other modules import some), stays importable from
``dattri_fn.operators.kfac`` and is the very same object."""

import importlib

import pytest

# (new module, names moved into it from dattri_fn.operators.kfac)
MOVES = [
    ("dattri_fn.operators.kfac_layers",
     ["_KFAC_KINDS", "_keys", "_kfac_specs", "_select", "_tied_uses", "_check_call", "kfac_tap"]),
    ("dattri_fn.operators.kfac_fisher",
     ["_SampledLoss", "_ExpectedLoss", "_expected_kind", "_expected_io", "fisher_losses"]),
    ("dattri_fn.operators.kfac_stats",
     ["KFACFactors", "EKFACFactors", "_LAMBDA_ENTRIES", "_tokens", "_passes", "_transposed",
      "_reduced", "_check_reduce", "_check_dtype", "_kfac_core", "kfac_factors",
      "_checked_kfac_pass", "ekfac_factors"]),
    ("dattri_fn.operators.kfac_inverse",
     ["_layout", "BlockLinOp", "_shapes", "_compute_dtype", "_read_blocks", "_eigen_apply",
      "_eigen_inverse", "_kfac_eigen", "kfac_operator", "_check_factors", "ihvp_kfac",
      "ihvp_ekfac"]),
    ("dattri_fn.operators.kfac_scores",
     ["_BLOCK_ENTRIES", "_as", "_pair_scores", "_low_rank_pair_scores", "low_rank_blocks",
      "layer_scores", "layer_self_scores"]),
]


@pytest.mark.parametrize("new,names", MOVES, ids=[n for n, _ in MOVES])
def test_moved_names_stay_importable_from_kfac(new, names):
    """For each moved name: getattr(kfac, name) is getattr(new module, name)."""
    old_mod = importlib.import_module("dattri_fn.operators.kfac")
    new_mod = importlib.import_module(new)
    for name in names:
        assert getattr(old_mod, name) is getattr(new_mod, name), f"{new}.{name}"


def test_public_names_and_packages_agree():
    """kfac.__all__ is unchanged and every package that re-exports a K-FAC name holds the same object."""
    import dattri_fn.operators as operators
    import dattri_fn.operators.kfac as kfac
    import dattri_fn.solve as solve
    from dattri_fn.operators.kfac_inverse import kfac_operator
    from dattri_fn.operators.kfac_stats import ekfac_factors

    assert kfac.__all__ == ["KFACFactors", "EKFACFactors", "BlockLinOp", "kfac_factors",
                            "ekfac_factors", "kfac_tap", "ihvp_kfac", "ihvp_ekfac",
                            "kfac_operator", "layer_scores", "layer_self_scores",
                            "low_rank_blocks"]
    assert all(hasattr(kfac, n) for n in kfac.__all__)
    assert operators.kfac_operator is kfac_operator
    assert solve.ekfac_factors is ekfac_factors
