r"""Upcycling on real data: ViT on Fashion-MNIST, dense continued vs upcycled vs MoE from scratch.

    sparse-upcycle compare --config configs/compare_vit_fmnist.py:tiny --workdir /tmp/cmp_vit_tiny
    sparse-upcycle compare --config configs/compare_vit_fmnist.py --workdir /tmp/cmp_vit

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (55k train / 5k
validation / 10k test; evaluation on the first 4,992 validation images, 39 batches of 128).
Model: a GAP ViT for 28×28×1 inputs with 4×4 patches (49 tokens). The MoE arms turn every
other MLP block into experts behind an expert-choice router (C = 2, combine weights normalised
per token, groups of 8 images), the paper's vision setting (Komatsuzaki et al. 2023 §3.1) with
fewer experts. ``upcycled`` copies the dense MLP into every expert and adds a fresh router;
``moe_scratch`` trains the same MoE from random weights. Every arm gets ``extra_compute`` × the
dense pre-training FLOPs, over 3 seeds.

Sizes (2-core CPU): ``:tiny`` width 64, depth 4, 8 experts, 400 pre-training steps, +50% extra
compute (7 min 43 s on a fresh clone, 2 nearly idle cores, measured after issue 13; the
machine's speed varies by up to ~1.4× within an hour); the default width 64, depth 6, 16
experts, 1,500 pre-training steps, +100% (see README for the measured time and results).
"""

import ml_collections
from _compare_common import set_schedules

from sparse_upcycle.compare import default_compare_config

SIZES = {
    # width, depth, mlp, heads, experts, pre-training steps, extra compute, peak lr
    "tiny": (64, 4, 256, 4, 8, 400, 0.5, 1e-3),
    "full": (64, 6, 256, 4, 16, 1500, 1.0, 1e-3),
}
TOKENS = (28 // 4) ** 2


def get_config(arg=None):
    size = arg or "full"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    width, depth, mlp, heads, experts, steps, extra, lr = SIZES[size]
    c = default_compare_config()
    t = c.train
    t.model = ml_collections.ConfigDict(
        {
            "family": "vit",
            "name": "tiny",
            "overrides": {
                "pool_type": "gap",
                "patch_size": 4,
                "width": width,
                "depth": depth,
                "mlp_dim": mlp,
                "num_heads": heads,
            },
            "moe": {
                "layers": "every_other",
                "router": "expert_choice",
                "capacity_factor": 2.0,
                "eval_capacity_factor": 2.0,
                "normalize_combine_weights": True,
                "group_size": 8 * TOKENS,
                "router_init_std": 0.02,
                "aux_loss_weight": 0.0,
                "router_z_loss_weight": 0.0,
            },
        }
    )
    t.data = ml_collections.ConfigDict({"name": "fashion_mnist", "batch_size": 128, "seed": 0})
    t.loss = ml_collections.ConfigDict({"z_loss": 0.0, "label_smoothing": 0.0})
    t.eval_steps = 39
    t.log_every = 50
    t.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 1, "async": True})
    set_schedules(c, lr, steps)  # warmup-stable-decay: see configs/_compare_common.py
    c.upcycle = ml_collections.ConfigDict({"method": "copy", "num_experts": experts})
    c.extra_compute = extra
    c.num_points = 4
    c.seeds = [0, 1, 2]
    return c
