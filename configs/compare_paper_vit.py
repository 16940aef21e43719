r"""The paper's protocol on images: a ViT pre-trained on Fashion-MNIST on an rsqrt schedule, then
every arm continues that schedule (Komatsuzaki et al. 2023, §3.1), upcycled with the dense
optimizer state kept (their vision setting), with few-shot linear probes on a second dataset
(their downstream evaluation) at every matched point.

    sparse-upcycle compare --config configs/compare_paper_vit.py:tiny --workdir /tmp/cmp_pvit_tiny
    sparse-upcycle compare --config configs/compare_paper_vit.py --workdir /tmp/cmp_paper_vit

Model and data as ``configs/compare_vit_fmnist.py:tiny`` (a GAP ViT, width 64, depth 4, 4×4
patches; 8 experts in blocks 1 and 3 behind an expert-choice router, C = 2; batch 128).

Protocol (``protocol = "continue"``): AdamW (weight decay 1e-4, gradient clipping 1.0) on
``lr = base / sqrt(max(step, W))``, ``W`` a tenth of pre-training, ``base = 1e-3 * sqrt(W)``;
every arm continues it from the last pre-training step with no new warmup or decay. Dense
continuation carries the dense AdamW state; ``upcycled`` tiles it into the experts
(``upcycle.optimizer = "tile"``: every expert starts with the dense MLP's moments, the router
with zeros).

Few-shot evaluation (``fewshot.py``): ridge-regression probes on the frozen pre-logit features
with 1, 5, 10 and 25 images per class of scikit-learn's digits (resized to 28×28), 3 draws
each, test accuracy on 797 held-out digits.

Arms, every one with ``extra_compute`` × the dense pre-training FLOPs:

* ``dense``: dense continuation.
* ``upcycled``: experts copied, optimizer state tiled (the paper's vision recipe).
* ``upcycled_reset``: the same with a fresh AdamW state (what the paper does for language).
* ``upcycled_c1``: tiled, capacity factor 1 (the MoE's step costs what the dense one does).

Sizes (2-core CPU): ``:tiny`` 100 pre-training steps; the default 2,500 (5.8 epochs), +25%.
Results in the README ("The paper's protocol on images").
"""

import ml_collections
from _compare_common import adamw
from compare_vit_fmnist import get_config as vit_config

SIZES = {"tiny": (100, 0.25), "full": (2500, 0.25)}  # pre-training steps, extra compute
PEAK_LR = 1e-3


def get_config(arg=None):
    size = arg or "full"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    steps, extra = SIZES[size]
    c = vit_config("tiny")
    warmup = steps // 10
    c.protocol = "continue"
    c.pretrain.steps = steps
    c.pretrain.eval_every = steps // 10
    c.pretrain.optimizer = adamw(PEAK_LR * warmup**0.5, warmup, "rsqrt")
    c.train.fewshot = ml_collections.ConfigDict(
        {
            "dataset": "digits",
            "shots": [1, 5, 10, 25],
            "seeds": 3,
            "l2_grid": [4.0**k for k in range(-3, 8)],
        }
    )
    c.upcycle.optimizer = "tile"
    c.extra_compute = extra
    c.seeds = [0, 1, 2]
    c1 = {"capacity_factor": 1.0, "eval_capacity_factor": 1.0}
    c.arms = ml_collections.ConfigDict(
        {
            "dense": {"kind": "dense", "overrides": {}},
            "upcycled": {"kind": "upcycle", "overrides": {}},
            "upcycled_reset": {"kind": "upcycle", "overrides": {"upcycle": {"optimizer": "reset"}}},
            "upcycled_c1": {"kind": "upcycle", "overrides": {"model": {"moe": c1}}},
        }
    )
    return c
