"""Feature stores: per-example features on disk, written shard by shard, resumable after a kill.

A store is a directory::

    manifest.json        request (config, params hash, dtype, row shape) + the committed shards
    shard-000000.npy     rows [0, n_0) of the features, a plain .npy read back memory-mapped
    shard-000001.npy     rows [n_0, n_0 + n_1) ...

Every attributor reduces to ``scores = T P^T`` (:mod:`dattri_fn.attribute.pipeline`); a store
holds ``T``, the train-side features, so a later run with new test points reads no training
data: pass the store where the method takes ``train``.

Crash safety. Each shard is written to a locked temp file, fsynced and renamed
(:func:`dattri_fn.io.atomic_path`); then the manifest, listing it, is replaced the same way (the
last shard's manifest also marks the store complete). The manifest is the commit record: a
shard file it does not list (a kill between the two renames) is recomputed. A resumed
:func:`build_store` first removes every temp file no live writer holds
(:func:`dattri_fn.io.clean_temps`), re-reads the data (hashing it, without computing features)
up to the last committed shard and continues from there, so the finished store is bit-identical
to one written without interruption (features of a shard depend only on its rows).

Refusal. A store records what produced it: the caller's ``config`` (method, projection
dimension, seed...), a SHA-256 of the params (names, dtypes, shapes, bytes), the SHA-256 of
every shard's input rows (the data and its order), the features' dtype and row shape, the
shard size, and the library, torch and numpy versions. Resuming or opening it with a request
that differs in any of these raises a ValueError naming the field, never a silent reuse.

A store written by several ranks (:mod:`dattri_fn.distributed`) is a directory of parts, one
per rank, with a manifest listing them; it reads as their concatenation in rank order.

A grouped store (:func:`write_grouped`, ``"kind": "grouped"``) holds several named members in
ONE shard, each with its own params and data hashes (the per-example gradients of ``k``
training steps, written by ``training.record`` in append mode): one shard and one manifest
commit for the group, and ``open_store(<group>/<member>)`` reads a member's rows alone.

Self-scores. ``s_i = <t(z_i), p(z_i)>`` needs each training example under the test-side map
too, which the train features alone do not give (influence: ``p = (H + damping I)^-1 g``).
A method's ``self_score`` given a :func:`record_store` therefore writes the diagonal itself,
a store of ``[n]`` rows (manifest ``"kind": "self"``) in the ``self/`` sub-directory, with the
same crash safety and the same request; given the opened store (:func:`open_store`), it reads
``self/`` back and reads no training data (:func:`self_scores`). Where ``p`` depends on the
method's state (TRAK's kernel, LoGra's eigenbasis, representer points' ``alpha``), the record
also carries the state's :func:`state_hash` (:func:`record_self`): a record made under another
state is refused naming ``state``, on resume and on reading back.
"""

from __future__ import annotations

# The store is split by concern; this module keeps every name importable from here.
from .store_build import StoreRecording, build_store, open_store, record_store
from .store_files import GROUPED as GROUPED
from .store_files import STATS as STATS
from .store_files import grouped_parts, stats_store, write_grouped
from .store_files import scores_file as scores_file
from .store_files import write_parts_manifest as write_parts_manifest
from .store_hash import batch_hash, params_hash, state_hash
from .store_manifest import BLOCK_ROWS as BLOCK_ROWS
from .store_manifest import FORMAT, FeatureStore, check_store_state
from .store_manifest import MANIFEST as MANIFEST
from .store_manifest import SELF as SELF
from .store_self import record_self, self_scores

__all__ = ["FeatureStore", "StoreRecording", "build_store", "open_store", "record_store",
           "stats_store", "self_scores", "record_self", "write_grouped", "grouped_parts",
           "params_hash", "state_hash", "check_store_state", "batch_hash", "FORMAT"]
