"""Evaluation: the bundled tasks, retraining ground truth, the metrics on it, and their plots."""
