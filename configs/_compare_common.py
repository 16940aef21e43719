"""Shared settings of the ``compare_*.py`` configs: the warmup-stable-decay schedules.

The dense model is pre-trained at a constant rate after warmup (no decay, like the rsqrt
plateau the paper's checkpoints were on); every arm then continues at the same peak (a short
warmup: its AdamW state starts empty) and decays it to 0 over its own budget, so no arm is
favoured by a schedule restart.
"""

import ml_collections

from sparse_upcycle.optim import default_optimizer_config


def adamw(lr: float, warmup: int, schedule: str) -> ml_collections.ConfigDict:
    o = default_optimizer_config("adamw")
    o.learning_rate = lr
    o.schedule = schedule  # cosine: decay_steps is set by compare to each run's own length
    o.warmup_steps = warmup
    o.end_learning_rate_factor = 0.0
    o.weight_decay = 1e-4
    o.clip_grad_norm = 1.0
    return o


def set_schedules(c: ml_collections.ConfigDict, lr: float, pretrain_steps: int) -> None:
    """Pre-training: warmup over a tenth, then constant; arms: 20 warmup steps, cosine to 0."""
    c.train.optimizer = adamw(lr, 20, "cosine")
    c.pretrain.steps = pretrain_steps
    c.pretrain.optimizer = adamw(lr, pretrain_steps // 10, "constant")
