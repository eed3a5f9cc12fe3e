"""Bundled real-data tasks for tests, benchmarks and evaluation; nothing is downloaded.

``get_task(name)`` returns a :class:`Task`: data tensors, a model factory, a deterministic
trainer and a ``target`` whose orientation matches the library's score convention
(``scores [n_train, n_test]``, positive = up-weighting the training example LOWERS the test
loss): every target is HIGHER = BETTER for the test point.

============  ==================================================================================
name          what
============  ==================================================================================
digits-lr     multinomial logistic regression on the 64 standardised pixels of sklearn's digits
digits-mlp    64-32-10 tanh MLP on the same features
digits-cnn    Conv(1->8)-ReLU-Conv(8->8)-ReLU-MaxPool-Linear(128->10) on 1x8x8 images (~2k params)
text-lm       a one-block character-level transformer LM on docstrings of fixed stdlib modules
============  ==================================================================================

Training minimises ``mean loss + 0.5 * weight_decay * ||theta||^2`` over ALL parameters, full
batch (L-BFGS for ``digits-lr``, Adam otherwise), so a model is a deterministic function of its
init seed and its training subset; influence methods match the objective with
``damping = weight_decay``. Hyper-parameters are in ``Task.hparams``.

The ``"adam"`` trainer is a functional run (:mod:`dattri_fn.training`, :func:`task_step`,
:func:`adam_run`) that reproduces ``torch.optim.Adam`` + ``CosineAnnealingLR`` on that objective
bit for bit (the trainer the tasks used before, kept as :func:`_train_adam_torch` and tested
equal with ``torch.equal``), so MAGIC can replay and differentiate the bundled models themselves;
it takes per-example ``weights`` too.

``hparams={"optimizer": "sgd", ...}`` (e.g. :data:`SGD_HPARAMS`) trains with mini-batch SGD with
momentum on the functional trainer (:mod:`dattri_fn.training`): a pure, replayable run that
MAGIC (:func:`dattri_fn.attribute.magic.magic`) differentiates, with the data order drawn from
:func:`order_seed` of the init seed; it also takes per-example ``weights``
(``train_model(..., weighted=True)``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import _msg, check_int, check_optional_int
from ..transforms.layers import cross_entropy_rows
from .tasks_data import (
    CORPUS_MODULES,
    VOCAB,
    _digits,
    _flip_labels,
    _split,
    derive_seed,
    text_corpus,
)
from .tasks_data import NOISE_FRACTION as NOISE_FRACTION
from .tasks_data import _generator as _generator
from .tasks_runs import _objective, adam_run, sgd_run, task_step
from .tasks_runs import _train_adam_torch as _train_adam_torch
from .tasks_runs import order_seed as order_seed
from .tiny_lm import TinyLM

# Data, the functional runs and TinyLM live in tasks_data / tasks_runs / tiny_lm (re-exported
# here). The model factories, trainers, losses and targets stay in this module: the retraining
# cache key (dattri_fn.eval.retrain.cache_key) hashes their module-qualified names.

TASKS = ("digits-lr", "digits-mlp", "digits-cnn", "text-lm")


@dataclasses.dataclass(frozen=True)
class Task:
    """A supervised task: data, model factory, trainer and a HIGHER = BETTER test target.

    Attributes:
        name: one of :data:`TASKS` (or a user's own).
        make_model: ``seed -> nn.Module``, initialised from ``seed`` without touching the
            global RNG.
        loss_fn: ``(output, target) -> Tensor[]``, the batch MEAN loss (cross-entropy; for
            ``text-lm`` over all tokens). One example's loss is ``loss_fn(out[i:i+1],
            y[i:i+1])``.
        train: ``(model, x, y, *, seed=0, epochs=None) -> model``; trains in place
            (deterministic full batch), ``epochs`` overrides ``hparams["epochs"]``.
        target: ``(model, x, y) -> Tensor[n]``, higher = better for each example: the correct-class
            margin ``logit_y - max_{c != y} logit_c`` (classification) or the negative
            per-sequence mean token loss (``text-lm``). No gradient.
        x_train, y_train, x_test, y_test: float32 features (int64 tokens for ``text-lm``) and
            int64 labels (next tokens ``[n, T]`` for ``text-lm``).
        hparams: training hyper-parameters (part of every retraining cache key).
        flipped: ``[n_train]`` bool marking flipped labels for ``noisy=True``, else ``None``.
        meta: facts about the data (``seed``, ``n_classes``, ``corpus_sha256``, ...).
    """

    name: str
    make_model: Callable[[int], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    train: Callable[..., nn.Module]
    target: Callable[[nn.Module, Tensor, Tensor], Tensor]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    hparams: dict[str, Any]
    flipped: Tensor | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]

    @property
    def n_test(self) -> int:
        return self.x_test.shape[0]

    def to(self, device) -> Task:
        """Return a copy with every data tensor on ``device``."""
        moved = {f: getattr(self, f).to(device) for f in
                 ("x_train", "y_train", "x_test", "y_test", "flipped")
                 if getattr(self, f) is not None}
        return dataclasses.replace(self, **moved)


# ----------------------------------------------------------------------------------- models
def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    # fork_rng keeps the caller's global RNG untouched while the default inits draw from it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("init", seed))
        return build()


def _make_lr(seed: int, *, features: int, classes: int) -> nn.Module:
    return _seeded(lambda: nn.Linear(features, classes), seed)


def _make_mlp(seed: int, *, features: int, hidden: int, classes: int) -> nn.Module:
    return _seeded(lambda: nn.Sequential(nn.Linear(features, hidden), nn.Tanh(),
                                         nn.Linear(hidden, classes)), seed)


def _make_cnn(seed: int, *, channels: int, classes: int) -> nn.Module:
    return _seeded(lambda: nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 16, classes)), seed)


def _make_lm(seed: int, **sizes) -> nn.Module:
    return _seeded(lambda: TinyLM(**sizes), seed)


# ------------------------------------------------------------------------- losses, targets
def classification_loss(output: Tensor, target: Tensor) -> Tensor:
    """Return the mean cross-entropy.  # [B, C], [B] -> []"""
    return F.cross_entropy(output, target)


classification_loss.per_example = cross_entropy_rows  # see layers.per_example_losses


def lm_loss(output: Tensor, target: Tensor) -> Tensor:
    """Return the mean next-token cross-entropy over all tokens.  # [B, T, V], [B, T] -> []"""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


@torch.no_grad()
def margin_target(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Return the correct-class margin logit_y - max_{c != y} logit_c (higher = better).  # [n]"""
    logits = model(x)
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return correct - others.amax(1)


@torch.no_grad()
def neg_sequence_loss_target(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Return -mean_t CE(logits_t, y_t) per sequence (higher = better).  # [n, T] -> [n]"""
    logits = model(x)
    ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    return -ce.mean(1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Return the share of argmax predictions equal to ``y`` (per token for an LM).  # -> []"""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).to(torch.float32).mean()


def _train_lbfgs(model: nn.Module, x: Tensor, y: Tensor, *, seed: int = 0,
                 epochs: int | None = None, loss_fn, weight_decay: float, lr: float,
                 default_epochs: int) -> nn.Module:
    del seed  # full-batch L-BFGS is deterministic: the init seed alone fixes the model
    model.train()
    opt = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=epochs or default_epochs,
                            history_size=20, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _objective(model, loss_fn, x, y, weight_decay)
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def _train_adam(model: nn.Module, x: Tensor, y: Tensor, *, seed: int = 0,
                epochs: int | None = None, loss_fn, weight_decay: float, lr: float,
                default_epochs: int, weights: Tensor | None = None) -> nn.Module:
    """Full-batch Adam with cosine-annealed ``lr`` on the functional trainer.

    Bit-identical to ``torch.optim.Adam(lr=lr)`` + ``CosineAnnealingLR(T_max=epochs)`` on the
    objective ``mean loss + 0.5 wd |theta|^2`` (tested with ``torch.equal``). Cosine decay lands
    close to a stationary point, which influence methods assume. ``weights [n]`` weight each
    example's loss (:func:`task_step`).
    """
    del seed  # full batch: the init seed alone fixes the model
    from ..model import functional_model
    from ..training import train

    optimizer, order = adam_run(x.shape[0], epochs=epochs or default_epochs, lr=lr)
    fm = functional_model(model, loss_fn)
    step = task_step(fm, optimizer, weight_decay)
    run = train(step, fm.params, optimizer.init(fm.params), (x, y), order, weights=weights)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(run.params[name])
    return model.eval()


def _train_sgd(model: nn.Module, x: Tensor, y: Tensor, *, seed: int = 0,
               epochs: int | None = None, loss_fn, weight_decay: float, lr: float,
               default_epochs: int, batch_size: int = 64, momentum: float = 0.9,
               weights: Tensor | None = None) -> nn.Module:
    """Mini-batch SGD with momentum on the functional trainer (:mod:`dattri_fn.training`).

    Cosine-decayed ``lr``, coupled weight decay, batches of ``batch_size`` in the order
    ``batch_order(n, seed=order_seed(seed))``; ``weights [n]`` weight each example's loss (0 =
    removed with the order kept: the fixed-randomness protocol of
    :func:`dattri_fn.eval.retrain.lds_ground_truth`).
    """
    from ..model import functional_model
    from ..training import make_step, train

    optimizer, order = sgd_run(x.shape[0], seed=seed, epochs=epochs or default_epochs, lr=lr,
                               weight_decay=weight_decay, batch_size=batch_size,
                               momentum=momentum)
    fm = functional_model(model, loss_fn)
    run = train(make_step(fm, optimizer), fm.params, optimizer.init(fm.params), (x, y), order,
                weights=weights)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(run.params[name])
    return model.eval()


_TRAINERS = {"lbfgs": _train_lbfgs, "adam": _train_adam, "sgd": _train_sgd}
# Keys only the "sgd" trainer reads: accepted as hparams overrides, absent from the defaults
# (so the other trainers' hparams, and the retraining cache keys built from them, are unchanged).
_SGD_KEYS = {"batch_size": 64, "momentum": 0.9}
SGD_HPARAMS = dict(optimizer="sgd", lr=0.05, epochs=40, batch_size=64, momentum=0.9)


_DEFAULT_SIZES = {"digits-lr": (1000, 200), "digits-mlp": (1000, 200),
                  "digits-cnn": (1000, 200), "text-lm": (256, 64)}

_HPARAMS = {
    "digits-lr": dict(optimizer="lbfgs", lr=1.0, epochs=100, weight_decay=1e-3),
    "digits-mlp": dict(optimizer="adam", lr=1e-2, epochs=300, weight_decay=1e-3, hidden=32),
    "digits-cnn": dict(optimizer="adam", lr=1e-2, epochs=100, weight_decay=1e-3, channels=8),
    "text-lm": dict(optimizer="adam", lr=1e-2, epochs=80, weight_decay=1e-4, context=32,
                    dim=32, heads=2, hidden=64),
}


def _trainer(hp: dict, loss_fn) -> Callable[..., nn.Module]:
    extra = {k: hp[k] for k in _SGD_KEYS if k in hp} if hp["optimizer"] == "sgd" else {}
    return functools.partial(_TRAINERS[hp["optimizer"]], loss_fn=loss_fn,
                             weight_decay=hp["weight_decay"], lr=hp["lr"],
                             default_epochs=hp["epochs"], **extra)


def _digits_task(name: str, n_train: int, n_test: int, seed: int, noisy: bool,
                 hp: dict) -> Task:
    x, y = _digits()
    tr, te = _split(x.shape[0], n_train, n_test, seed, "get_task")
    mean, std = x[tr].mean(0), x[tr].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # border pixels are constant 0
    x = (x - mean) / std
    if name == "digits-cnn":
        x = x.reshape(-1, 1, 8, 8)
    make = {"digits-lr": functools.partial(_make_lr, features=64, classes=10),
            "digits-mlp": functools.partial(_make_mlp, features=64, hidden=hp.get("hidden", 0),
                                            classes=10),
            "digits-cnn": functools.partial(_make_cnn, channels=hp.get("channels", 0),
                                            classes=10)}[name]
    y_train, flipped = y[tr], None
    if noisy:
        y_train, flipped = _flip_labels(y_train, 10, seed)
    return Task(name, make, classification_loss, _trainer(hp, classification_loss),
                margin_target, x[tr].contiguous(), y_train, x[te].contiguous(), y[te], hp,
                flipped, {"seed": seed, "noisy": noisy, "n_classes": 10, "source":
                          "sklearn.datasets.load_digits", "pixel_mean": mean, "pixel_std": std})


def _text_task(n_train: int, n_test: int, seed: int, hp: dict) -> Task:
    text = text_corpus()
    lookup = {c: i for i, c in enumerate(VOCAB)}
    tokens = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    T = hp["context"]
    chunks = tokens[: (tokens.numel() // (T + 1)) * (T + 1)].reshape(-1, T + 1)
    tr, te = _split(chunks.shape[0], n_train, n_test, seed, "get_task")
    make = functools.partial(_make_lm, vocab=len(VOCAB), context=T, dim=hp["dim"],
                             heads=hp["heads"], hidden=hp["hidden"])
    meta = {"seed": seed, "noisy": False, "vocab": VOCAB, "modules": CORPUS_MODULES,
            "corpus_chars": len(text),
            "corpus_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return Task("text-lm", make, lm_loss, _trainer(hp, lm_loss), neg_sequence_loss_target,
                chunks[tr, :-1].contiguous(), chunks[tr, 1:].contiguous(),
                chunks[te, :-1].contiguous(), chunks[te, 1:].contiguous(), hp, None, meta)


def get_task(name: str, *, n_train: int | None = None, n_test: int | None = None,
             seed: int = 0, noisy: bool = False, hparams: dict | None = None) -> Task:
    """Return the bundled task ``name`` with a ``seed``-drawn train/test split.

    Args:
        name: one of ``"digits-lr"``, ``"digits-mlp"``, ``"digits-cnn"``, ``"text-lm"``.
        n_train: training examples (default 1000 for digits, 256 sequences for ``text-lm``).
        n_test: test examples (default 200 for digits, 64 sequences for ``text-lm``).
        seed: draws the split (and the flipped labels); digits features are standardised
            with the training split's statistics.
        noisy: flip 10% of the training labels (classification only); ``Task.flipped`` marks
            them.
        hparams: overrides of the task's training hyper-parameters, e.g.
            ``{"weight_decay": 1e-2, "epochs": 50}``; see ``get_task(name).hparams`` for keys.
            ``{"optimizer": "sgd", ...}`` also accepts ``batch_size`` and ``momentum``
            (defaults 64 and 0.9; :data:`SGD_HPARAMS` is the setting of the MAGIC benchmark).

    Returns:
        A :class:`Task` with float32 data on the CPU (``Task.to(device)`` to move it).

    Raises:
        TypeError: wrong kinds of arguments.
        ValueError: unknown ``name`` or ``hparams`` key, sizes beyond the data, or ``noisy``
            for ``text-lm``.
    """
    if not isinstance(name, str):
        raise TypeError(_msg("get_task", "name", "a str", type(name).__name__))
    if name not in TASKS:
        raise ValueError(_msg("get_task", "name", "one of " + ", ".join(map(repr, TASKS)),
                              repr(name)))
    n_train = check_optional_int("get_task", "n_train", n_train) or _DEFAULT_SIZES[name][0]
    n_test = check_optional_int("get_task", "n_test", n_test) or _DEFAULT_SIZES[name][1]
    seed = check_int("get_task", "seed", seed, minimum=0)
    hp = dict(_HPARAMS[name])
    if hparams is not None:
        if not isinstance(hparams, dict):
            raise TypeError(_msg("get_task", "hparams", "a dict or None", type(hparams).__name__))
        known = set(hp) | (set(_SGD_KEYS) if hparams.get("optimizer") == "sgd" else set())
        unknown = sorted(set(hparams) - known)
        if unknown:
            raise ValueError(_msg("get_task", "hparams", f"keys among {sorted(known)}",
                                  f"unknown {unknown}"))
        if hparams.get("optimizer", hp["optimizer"]) not in _TRAINERS:
            raise ValueError(_msg("get_task", "hparams", "optimizer among "
                                  + ", ".join(map(repr, _TRAINERS)),
                                  repr(hparams.get("optimizer"))))
        hp.update(hparams)
        if hp["optimizer"] == "sgd":
            hp = {**_SGD_KEYS, **hp}
    if name == "text-lm":
        if noisy:
            raise ValueError(_msg("get_task", "noisy", "False for 'text-lm'", "True",
                                  "Label noise is defined for the digits tasks only."))
        return _text_task(n_train, n_test, seed, hp)
    return _digits_task(name, n_train, n_test, seed, bool(noisy), hp)


def train_model(task: Task, *, seed: int = 0, keep: Tensor | None = None,
                epochs: int | None = None, weighted: bool = False) -> nn.Module:
    """Return ``task.make_model(seed)`` trained on the rows of ``keep`` (all by default).

    Args:
        task: the task.
        seed: init (and training) seed.
        keep: ``[n_train]`` bool mask or int64 indices of the training examples to use.
        epochs: overrides ``task.hparams["epochs"]``.
        weighted: train on ALL rows in the full run's data order with the examples outside
            ``keep`` weighted 0 (the fixed-randomness protocol); needs a trainer that takes
            ``weights`` (``hparams["optimizer"]`` ``"sgd"`` or ``"adam"``; full-batch Adam then
            averages the loss over all ``n`` rows, the removed ones counting 0).

    Raises:
        ValueError: ``weighted=True`` with a trainer that takes no ``weights``.
    """
    x, y = task.x_train, task.y_train
    extra = {}
    if weighted:
        if "weights" not in inspect.signature(task.train).parameters:
            raise ValueError(_msg("train_model", "weighted", "a task whose trainer takes "
                                  "weights (hparams optimizer 'sgd' or 'adam')",
                                  f"optimizer {task.hparams.get('optimizer')!r}",
                                  "Build the task with get_task(name, hparams=SGD_HPARAMS)."))
        w = torch.ones(x.shape[0], dtype=x.dtype if x.is_floating_point() else torch.float32,
                       device=x.device)
        if keep is not None:
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask[keep] = True
            w = w * mask
        extra["weights"] = w
    elif keep is not None:
        x, y = x[keep], y[keep]
    model = task.make_model(seed).to(x.device)
    # One CPU thread: float32 reductions then run in one order whatever the caller's thread
    # setting (a retraining worker, a test, the demo), so a seed fixes the model bit for bit;
    # for these small models one thread was also the fastest (see dattri_fn.eval.retrain).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return task.train(model, x, y, seed=seed, epochs=epochs, **extra)
    finally:
        torch.set_num_threads(threads)
