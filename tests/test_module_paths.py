"""The mechanical splits of stop 17 moved code into new modules; every name stays importable
from the module it lived in (other files import it from there) and is the very same object."""

import importlib

import pytest

# (old module, new module, names moved from the old one to the new one)
MOVES = [
    ("dattri_fn.testing.checks", "dattri_fn.testing.operator_checks",
     ["check_linop", "check_inverse", "MIXED_INPUT"]),
    ("dattri_fn.testing.checks", "dattri_fn.testing.projector_checks",
     ["check_projector", "jl_d_eff"]),
    ("dattri_fn.testing.checks", "dattri_fn.testing.method_checks", ["check_method"]),
    ("dattri_fn.testing.checks", "dattri_fn.testing.assertions", ["default_rtol"]),
    ("dattri_fn.testing.problems", "dattri_fn.testing.references",
     ["CURVATURES", "mean_loss_flat", "dense_hessian", "per_example_grads", "dense_fisher",
      "dense_gauss_newton", "dense_curvature", "exact_influence", "loo_params", "exact_loo"]),
    ("dattri_fn.testing.problems", "dattri_fn.testing.matrices",
     ["MATRICES", "spd_matrix", "psd_matrix", "indefinite_matrix", "low_rank_plus_diagonal"]),
    ("dattri_fn.eval.metrics", "dattri_fn.eval.correlation",
     ["rank", "pearson", "spearman", "correlation_pvalue"]),
    ("dattri_fn.eval.metrics", "dattri_fn.eval.detection",
     ["NoisyLabelResult", "BrittlenessResult", "noisy_label_detection", "brittleness",
      "brittleness_curve"]),
    ("dattri_fn.transforms.project", "dattri_fn.transforms.projector",
     ["Projector", "KINDS", "_MASK64", "_block_seed", "_device_key", "_splitmix64"]),
    ("dattri_fn.attribute.ensemble", "dattri_fn.attribute.dropout_masks",
     ["MembersState", "dropout_mask", "dropout_members"]),
    ("dattri_fn.attribute.magic", "dattri_fn.attribute.metagradient",
     ["MetaGradient", "metagradient", "band_weights", "_split", "_join", "_row_norms",
      "_check_horizon"]),
]


@pytest.mark.parametrize("old,new,names", MOVES, ids=[f"{o}->{n}" for o, n, _ in MOVES])
def test_moved_names_stay_importable_from_their_old_module(old, new, names):
    """For each moved name: getattr(old module, name) is getattr(new module, name)."""
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_mod, name) is getattr(new_mod, name), f"{old}.{name}"


def test_packages_export_the_same_objects():
    """dattri_fn.testing / dattri_fn.attribute / dattri_fn export the objects the new modules define."""
    import dattri_fn
    import dattri_fn.attribute as attribute
    import dattri_fn.testing as kit
    from dattri_fn.attribute.dropout_masks import dropout_members
    from dattri_fn.testing.method_checks import check_method
    from dattri_fn.testing.references import exact_loo
    from dattri_fn.transforms.project import make_projector

    assert kit.check_method is check_method and kit.exact_loo is exact_loo
    assert attribute.dropout_members is dropout_members
    assert dattri_fn.make_projector is make_projector
