"""A functional, replayable trainer: pure steps, seeded data orders, checkpoints and replay."""

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
