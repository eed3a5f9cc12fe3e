"""A functional, replayable trainer: pure steps, seeded data orders, checkpoints, replay, and a
recorder for the user's own loop (what optimizer-aware attribution reads)."""

from .record import (
    Checkpoint,
    GradSpec,
    Moments,
    Record,
    Recording,
    finish_record,
    record_step,
    record_trajectory,
    start_record,
)
from .run import Trajectory, batch_order, replay, take, train
from .steps import (
    AdamState,
    Optimizer,
    SGDState,
    adam,
    adamw,
    cosine_schedule,
    make_step,
    sgd,
    weighted_loss,
)

__all__ = [
    "AdamState",
    "Checkpoint",
    "GradSpec",
    "Moments",
    "Record",
    "Recording",
    "finish_record",
    "record_step",
    "record_trajectory",
    "start_record",
    "Optimizer",
    "SGDState",
    "Trajectory",
    "adam",
    "adamw",
    "batch_order",
    "cosine_schedule",
    "make_step",
    "replay",
    "sgd",
    "take",
    "train",
    "weighted_loss",
]
