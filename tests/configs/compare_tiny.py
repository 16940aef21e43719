"""A seconds-long ``compare`` for tests: tiny ViT on synthetic images, 2 seeds, 2 points."""

import ml_collections

from sparse_upcycle.compare import default_compare_config
from sparse_upcycle.optim import default_optimizer_config


def get_config(arg=None):
    c = default_compare_config()
    t = c.train
    t.model = ml_collections.ConfigDict(
        {
            "family": "vit",
            "name": "tiny",
            "overrides": {"pool_type": "gap"},
            "moe": {"router": "expert_choice", "capacity_factor": 2.0, "group_size": 64},
        }
    )
    t.data = ml_collections.ConfigDict(
        {"name": "synthetic", "batch_size": 8, "seed": 0, "noise": 2.0}
    )
    t.eval_steps = 2
    t.log_every = 1
    t.peak_flops = 1e10
    t.checkpoint = ml_collections.ConfigDict({"every": 100, "keep": 1, "async": False})
    o = default_optimizer_config("adamw")
    o.learning_rate = 3e-3
    o.schedule = "constant"
    o.warmup_steps = 0
    t.optimizer = o
    c.pretrain.steps = 8
    c.pretrain.optimizer = o
    c.upcycle = ml_collections.ConfigDict({"method": "copy", "num_experts": 4})
    c.extra_compute = 1.0
    c.num_points = 2
    c.seeds = [0, 1]
    return c
