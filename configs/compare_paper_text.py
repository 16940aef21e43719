r"""The paper's protocol on real text: a Llama-style decoder pre-trained on the Python docs on an
rsqrt schedule until its validation loss flattens, then every arm continues that schedule
(Komatsuzaki et al. 2023, §3.1), with the hypotheses the restart-protocol runs left open
(top-1 vs top-2 routing, 8, 16 or 32 experts) as arms on the same checkpoint.

    sparse-upcycle compare --config configs/compare_paper_text.py:tiny --workdir /tmp/cmp_paper_tiny
    sparse-upcycle compare --config configs/compare_paper_text.py --workdir /tmp/cmp_paper

Data and model as ``configs/compare_btx_text.py`` (the Python 3.11 documentation, 2,000
SentencePiece pieces, windows of 128 + 1 tokens, batch 16; d=128, 4 layers, 4 heads, f=512).

Protocol (``protocol = "continue"``): AdamW (weight decay 1e-4, gradient clipping 1.0) on an
rsqrt schedule, ``lr = base / sqrt(max(step, 500))`` with ``base = 1e-3 * sqrt(500)`` (1e-3
for 500 steps, 3.5e-4 at step 4,000). Every arm continues it from the last pre-training step
(``optimizer.step_offset``), with no new warmup and no decay to its own end. Dense
continuation carries the dense run's AdamW state (moments and step count); the upcycled arms
start with a fresh state (``upcycle.optimizer = reset``, the paper's language setting). The
paper uses Adafactor for T5; AdamW is used here (the optimizer of every other text run of this
project), on the same schedule family.

Arms, every one with ``extra_compute`` × the dense pre-training FLOPs:

* ``dense``: dense continuation.
* ``upcycled``: Mixtral's routing (top-2 of 8, softmax over the two picked logits, dropless,
  load-balancing loss 0.01, router z-loss 0.001) in every other layer, experts copied.
* ``upcycled_top1``: as ``upcycled`` with one expert per token (the MoE's step FLOPs equal the dense
  model's, so it takes as many steps as ``dense``).
* ``upcycled_e16``, ``upcycled_e32``: as ``upcycled`` with 16 and 32 experts (the paper found 32
  best).
* ``upcycled_lr2x``: as ``upcycled`` on twice the continued rate (the learning rate of the
  upcycled arm; dense keeps its own).
* ``dense_restart``, ``upcycled_restart``: the restart protocol of the other compare configs
  on this checkpoint (a fresh AdamW state, 20 warmup steps to 1e-3, cosine to 0 over the arm's
  own length), to tell the protocol's effect from the checkpoint's length.

Sizes (2-core CPU): ``:tiny`` d=64, 2 layers, seq 64, 300 pre-training steps; the default
4,000 pre-training steps, +25%. Results in the README ("The paper's protocol on text").
"""

import ml_collections
from _compare_common import adamw
from compare_btx_text import SIZES as BTX_SIZES
from compare_btx_text import get_config as btx_config

WARMUP = 500  # the rsqrt schedule's constant part (optim.py)
SIZES = {  # pre-training steps, extra compute
    "tiny": (300, 0.25),
    "full": (4000, 0.25),
}


def get_config(arg=None):
    size = arg or "full"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    steps, extra = SIZES[size]
    c = btx_config(size)
    peak = BTX_SIZES[size][-1]
    warmup = min(WARMUP, steps // 4)
    c.protocol = "continue"
    c.pretrain.steps = steps
    c.pretrain.eval_every = steps // 16
    c.pretrain.optimizer = adamw(peak * warmup**0.5, warmup, "rsqrt")
    c.train.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 1, "async": True})
    c.extra_compute = extra
    c.num_points = 4
    c.seeds = [0, 1, 2]

    def upcycled(k=None, experts=None):
        over: dict = {}
        if k is not None:
            over["model"] = {"moe": {"k": k}}
            over["upcycle"] = {"k": k}
        if experts is not None:
            over.setdefault("upcycle", {})["num_experts"] = experts
        return {"kind": "upcycle", "overrides": over}

    restart = adamw(peak, 20, "cosine").to_dict()  # step_offset 0: a schedule of its own
    c.arms = ml_collections.ConfigDict(
        {
            "dense": {"kind": "dense", "overrides": {}},
            "upcycled": upcycled(),
            "upcycled_top1": upcycled(k=1),
            "upcycled_e16": upcycled(experts=16),
            "upcycled_e32": upcycled(experts=32),
            "upcycled_lr2x": {
                "kind": "upcycle",
                "overrides": {
                    "optimizer": {"learning_rate": 2 * c.pretrain.optimizer.learning_rate}
                },
                "against": ["upcycled"],
            },
            "dense_restart": {
                "kind": "dense",
                "overrides": {"optimizer": restart, "init_opt_state": "reset"},
                "against": ["dense"],
            },
            "upcycled_restart": {
                "kind": "upcycle",
                "overrides": {"optimizer": restart},
                "against": ["dense_restart", "upcycled"],
            },
        }
    )
    return c
