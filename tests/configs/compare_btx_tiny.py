"""A seconds-long Branch-Train-MiX ``compare`` for tests: a tiny decoder on a text corpus
(``--config.train.data.corpus_dir`` / ``cache_dir`` given by the test), two branches on
complementary document selections, one seed."""

import ml_collections

from sparse_upcycle.compare import default_compare_config
from sparse_upcycle.optim import default_optimizer_config


def get_config(arg=None):
    c = default_compare_config()
    t = c.train
    t.model = ml_collections.ConfigDict(
        {
            "family": "decoder",
            "name": "tiny",
            "overrides": {"vocab_size": 160},
            "moe": {"router": "top_k", "k": 2, "capacity_factor": 2.0, "layers": "all"},
        }
    )
    t.data = ml_collections.ConfigDict(
        {"name": "text", "vocab_size": 150, "seq_len": 16, "batch_size": 8, "seed": 0}
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
    c.num_points = 4
    c.seeds = [0]
    c.arms = ml_collections.ConfigDict(
        {
            "dense": {"kind": "dense", "overrides": {}},
            "upcycled": {"kind": "upcycle", "overrides": {}},
            "btx": {
                "kind": "btx",
                "branches": {
                    "zero": {"data": {"include_documents": ["part0/*"]}},
                    "rest": {"data": {"exclude_documents": ["part0/*"]}},
                },
                "branch_compute": 0.5,
                "overrides": {},
            },
        }
    )
    return c
