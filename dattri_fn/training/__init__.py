"""A functional, replayable trainer: pure steps, seeded data orders, checkpoints, replay, and a
recorder for the user's own loop (what optimizer-aware attribution reads)."""

from .gemm_conv import GemmConv2d, gemm_conv2d, with_gemm_convs
from .heap import keep_heap
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
    "GemmConv2d",
    "GradSpec",
    "Moments",
    "Record",
    "Recording",
    "finish_record",
    "gemm_conv2d",
    "keep_heap",
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
    "with_gemm_convs",
]
