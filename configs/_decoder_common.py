"""Run settings shared by the decoder configs (``llama_moe_8x_top2.py``,
``qwen_moe_fine_grained.py``): AdamW with a cosine decay over the run, the full-scale run on
token shards of an HF checkpoint, and the CPU-sized run on synthetic text. Loaded by path, as
``_t5_common.py`` (config files are executed from a path, not imported as a package)."""

import ml_collections

from sparse_upcycle.optim import default_optimizer_config


def adamw(
    c: ml_collections.ConfigDict,
    peak: float,
    warmup: int,
    *,
    eps: float = 1e-5,
    weight_decay: float = 0.1,
) -> None:
    """AdamW (b1 0.9, b2 0.95, clipping 1.0) with a cosine decay to 10% of ``peak`` over the
    whole run (``decay_steps`` follows a ``total_steps`` override)."""
    o = c.optimizer = default_optimizer_config("adamw")
    o.schedule = "cosine"
    o.learning_rate = peak
    o.warmup_steps = warmup
    o.decay_steps = c.get_ref("total_steps")
    o.end_learning_rate_factor = 0.1
    o.b1, o.b2, o.eps = 0.9, 0.95, eps
    o.weight_decay = weight_decay
    o.clip_grad_norm = 1.0


def full_scale_run(c: ml_collections.ConfigDict, mesh: dict) -> None:
    """20k steps of 256 × 4096 tokens from token shards (``data.path`` and ``init_from`` empty
    on purpose: the run stops asking for them), checkpoints every 1000 steps."""
    c.init_from = ""  # "": train.py asks for the HF directory
    c.total_steps = 20_000
    c.mesh = ml_collections.ConfigDict(mesh)
    c.data = ml_collections.ConfigDict(
        {
            "name": "token_shards",
            "path": "",  # "": the pipeline asks for the shard directory
            "tokenizer": "",
            "batch_size": 256,
            "seq_len": 4096,
            "seed": 0,
        }
    )
    c.log_every = 50
    c.eval_every = 1_000
    c.eval_steps = 20
    c.checkpoint = ml_collections.ConfigDict({"every": 1_000, "keep": 3, "async": True})


def tiny_run(c: ml_collections.ConfigDict, steps: int, *, eps: float = 1e-5) -> None:
    """CPU-sized: ``steps`` steps of 16 synthetic 32-token sequences on one device group, AdamW
    peak 3e-3 without weight decay, checkpoints every 100 steps."""
    c.init_from = ""
    c.total_steps = steps
    c.mesh = ml_collections.ConfigDict({"data": -1, "expert": 1, "model": 1})
    c.data = ml_collections.ConfigDict(
        {"name": "synthetic", "batch_size": 16, "seq_len": 32, "seed": 0}
    )
    adamw(c, peak=3e-3, warmup=20, eps=eps, weight_decay=0.0)
    c.log_every = 20
    c.eval_every = 100
    c.eval_steps = 4
    c.checkpoint = ml_collections.ConfigDict({"every": 100, "keep": 2, "async": True})
