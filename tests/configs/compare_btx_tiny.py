"""A seconds-long Branch-Train-MiX ``compare`` for tests: ``compare_tiny``'s run settings with a
tiny decoder on a text corpus (``--config.train.data.corpus_dir`` / ``cache_dir`` given by the
test), two branches on complementary document selections, one seed."""

import ml_collections
from compare_tiny import get_config as tiny_config


def get_config(arg=None):
    c = tiny_config()
    c.train.model = ml_collections.ConfigDict(
        {
            "family": "decoder",
            "name": "tiny",
            "overrides": {"vocab_size": 160},
            "moe": {"router": "top_k", "k": 2, "capacity_factor": 2.0, "layers": "all"},
        }
    )
    c.train.data = ml_collections.ConfigDict(
        {"name": "text", "vocab_size": 150, "seq_len": 16, "batch_size": 8, "seed": 0}
    )
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
