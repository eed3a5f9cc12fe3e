"""Old import paths of the modules split in stop 18 keep working (engineer E's mechanical splits)."""

import importlib

import pytest

# old module -> {name: new module}; every name must be the very same object from both paths
MOVED = {
    "dattri_fn.store": {
        **dict.fromkeys(["params_hash", "state_hash", "batch_hash"], "dattri_fn.store_hash"),
        **dict.fromkeys(["FORMAT", "MANIFEST", "SELF", "BLOCK_ROWS", "FeatureStore",
                         "check_store_state"], "dattri_fn.store_manifest"),
        **dict.fromkeys(["GROUPED", "STATS", "write_grouped", "grouped_parts", "scores_file",
                         "write_parts_manifest", "stats_store"], "dattri_fn.store_files"),
        **dict.fromkeys(["StoreRecording", "record_store", "build_store", "open_store"],
                        "dattri_fn.store_build"),
        **dict.fromkeys(["self_scores", "record_self"], "dattri_fn.store_self"),
    },
    "dattri_fn.eval.tasks": {
        **dict.fromkeys(["NOISE_FRACTION", "CORPUS_MODULES", "VOCAB", "derive_seed", "text_corpus"],
                        "dattri_fn.eval.tasks_data"),
        **dict.fromkeys(["task_step", "adam_run", "_train_adam_torch", "order_seed", "sgd_run"],
                        "dattri_fn.eval.tasks_runs"),
        "TinyLM": "dattri_fn.eval.tiny_lm",
    },
    "dattri_fn.attribute.representer": {
        "fit_head": "dattri_fn.attribute.representer_fit",
        "_soft_targets": "dattri_fn.attribute.representer_fit",
        "_lbfgs": "dattri_fn.solve.lbfgs",
    },
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_serve_the_moved_objects(old):
    """For every moved name n: getattr(old module, n) is getattr(new module, n)."""
    mod = importlib.import_module(old)
    for name, new in MOVED[old].items():
        assert getattr(mod, name) is getattr(importlib.import_module(new), name), (old, name)
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), (old, name)


def test_store_classes_keep_their_module():
    """FeatureStore/StoreRecording report dattri_fn.store: pickles and _checks's store refusal name it."""
    import pickle

    from dattri_fn.store import FeatureStore, StoreRecording

    assert FeatureStore.__module__ == StoreRecording.__module__ == "dattri_fn.store"
    fs = FeatureStore("p", {"format": "x"}, (("f", 3),))
    assert pickle.loads(pickle.dumps(fs)) == fs
    from dattri_fn._checks import _refuse_store

    with pytest.raises(TypeError, match=r"f\(train=...\): expected examples"):
        _refuse_store("f", "train", fs)


def test_task_callables_keep_the_cache_key_module():
    """The callables retrain.cache_key hashes by module-qualified name stay in dattri_fn.eval.tasks."""
    from dattri_fn.eval import tasks

    fns = [tasks._make_lr, tasks._make_mlp, tasks._make_cnn, tasks._make_lm, tasks._train_lbfgs,
           tasks._train_adam, tasks._train_sgd, tasks.classification_loss, tasks.lm_loss,
           tasks.margin_target, tasks.neg_sequence_loss_target, *tasks._TRAINERS.values()]
    assert {f.__module__ for f in fns} == {"dattri_fn.eval.tasks"}
    for name, hp in tasks._HPARAMS.items():  # the trainers get_task wires in
        assert tasks._trainer(hp, tasks.classification_loss).func in fns, name
