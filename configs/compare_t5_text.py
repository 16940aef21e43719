r"""Upcycling on real text: T5 (span corruption), dense continued vs upcycled vs MoE from scratch.

    sparse-upcycle compare --config configs/compare_t5_text.py:tiny --workdir /tmp/cmp_t5_tiny
    sparse-upcycle compare --config configs/compare_t5_text.py --workdir /tmp/cmp_t5

Data: the Python 3.11 documentation sources (Debian ``python3.11-doc``, ~11 MB of English
reStructuredText, PSF License), split by document (90/5/5), a SentencePiece vocabulary trained
locally on the train documents (cached under ``~/.cache/sparse_upcycle``; the first run trains
it in ~10 s), and T5 span corruption (noise density 0.15, mean span 3, sentinels counted down
from the last id as T5's ``<extra_id_k>``). Metrics are the targets' per-token loss and
accuracy on the first ``eval_steps`` validation batches (the same batches for every arm).

Model: T5 v1.1-style encoder-decoder (gated GELU). The MoE arms turn every other MLP block of
each stack into experts: expert choice (C = 2) in the encoder, top-2 (softmax then top-K,
T5X's C = 2) in the decoder, the paper's language setting (Komatsuzaki et al. 2023 §3.1; see
``configs/_t5_common.py``). ``upcycled`` copies the dense MLP into every expert behind a fresh
router; ``moe_scratch`` trains the same MoE from random weights. Every arm gets
``extra_compute`` × the dense pre-training FLOPs, over 3 seeds.

Sizes (2-core CPU): ``:tiny`` d=64, 2+2 layers, 8 experts, inputs 64 / targets 16, 400
pre-training steps, +50%; the default d=128, 4+4 layers, 16 experts, inputs 128 / targets 32,
1,000 pre-training steps, +50%: 2.6e14 model training FLOPs in all (47 GFLOPs per dense
step). Measured: 67 minutes on 2 cores, with other jobs sharing them part of the time
(pre-training 590 s, then 379 / 294 / 475 s per seed for dense / upcycled / scratch). Results
in the README ("Full size T5 / text").
"""

import ml_collections
from _compare_common import set_schedules
from _t5_common import moe_blocks

from sparse_upcycle.compare import default_compare_config

SIZES = {
    # emb, heads, head_dim, mlp, layers, experts, inputs, targets, pieces, steps, extra, lr
    "tiny": (64, 4, 16, 256, 2, 8, 64, 16, 2000, 400, 0.5, 1e-3),
    "full": (128, 4, 32, 512, 4, 16, 128, 32, 8000, 1000, 0.5, 1e-3),
}
EXTRA_IDS = 100
BATCH = 32


def get_config(arg=None):
    size = arg or "full"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    emb, heads, head_dim, mlp, layers, experts, inputs, targets, pieces, steps, extra, lr = SIZES[
        size
    ]
    encoder_moe, decoder_moe = moe_blocks(experts, group_size=4 * inputs)
    decoder_moe["group_size"] = 4 * targets
    c = default_compare_config()
    t = c.train
    t.model = ml_collections.ConfigDict(
        {
            "family": "t5",
            "name": "tiny",
            "overrides": {
                "vocab_size": pieces + EXTRA_IDS,
                "emb_dim": emb,
                "num_heads": heads,
                "head_dim": head_dim,
                "mlp_dim": mlp,
                "num_encoder_layers": layers,
                "num_decoder_layers": layers,
            },
            "encoder_moe": encoder_moe,
            "decoder_moe": decoder_moe,
        }
    )
    t.data = ml_collections.ConfigDict(
        {
            "name": "text",
            "vocab_size": pieces,
            "extra_ids": EXTRA_IDS,
            "seq_len": inputs,
            "target_len": targets,
            "noise_density": 0.15,
            "mean_noise_span_length": 3.0,
            "batch_size": BATCH,
            "seed": 0,
        }
    )
    t.loss = ml_collections.ConfigDict({"z_loss": 1e-4, "label_smoothing": 0.0})
    t.eval_steps = 40
    t.log_every = 50
    t.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 1, "async": True})
    set_schedules(c, lr, steps)  # warmup-stable-decay: see configs/_compare_common.py
    c.upcycle = ml_collections.ConfigDict(
        {"method": "copy", "num_experts": experts, "router_init_std": 0.02}
    )
    c.extra_compute = extra
    c.num_points = 4
    c.seeds = [0, 1, 2]
    return c
