r"""Branch-Train-MiX on real text: a Llama-style decoder's branches on two halves of the Python
docs, mixed into an MoE, against single-source upcycling and dense continuation.

    sparse-upcycle compare --config configs/compare_btx_text.py:tiny --workdir /tmp/cmp_btx_tiny
    sparse-upcycle compare --config configs/compare_btx_text.py --workdir /tmp/cmp_btx

Data: the Python 3.11 documentation sources (``sparse_upcycle/data/text.py``: documents split
90/5/5 by a hash of their path, a SentencePiece vocabulary of 2,000 pieces trained on the train
documents), packed into windows of ``seq_len`` + 1 tokens for next-token prediction. The two
domains are ``library/*`` (the standard-library reference, 288 train documents, 1.54M tokens)
and everything else (tutorial, how-tos, FAQ, language reference, C API, what's new: 164 train
documents, 1.23M tokens). Metrics: per-token loss and accuracy on the first ``eval_steps``
batches of the whole validation split (both domains), the same for every arm.

Arms, every one with ``extra_compute`` × the dense pre-training FLOPs after the same dense
checkpoint:

* ``dense``: dense continuation on all the data.
* ``upcycled``: the dense MLP copied into 8 experts behind a fresh router in every other layer,
  with Mixtral's routing (top-2, softmax over the two picked logits, dropless, load-balancing
  loss 0.01, router z-loss 0.001; ``configs/llama_moe_8x_top2.py``), so it starts as the dense
  function; trained on all the data.
* ``btx`` (Sukhbaatar et al. 2024): two dense branches from the checkpoint, one per domain,
  each with a quarter of the budget (``branch_compute`` 0.5 split between them); the MoE takes
  4 experts from each branch's MLP and the average of the two branches for every other
  parameter (their §2.2), then trains on all the data with the other half.

Pre-training: warmup then a constant rate, the arms a short warmup and cosine to 0 over their
own length (``configs/_compare_common.py``). Sizes (2-core CPU): ``:tiny`` d=64, 2 layers,
seq 64; the default d=128, 4 layers (4 heads, f=512), seq 128, batch 16, 600 pre-training
steps, +50%. Results in the README ("Branch-Train-MiX / text").
"""

import ml_collections
from _compare_common import set_schedules

from sparse_upcycle.compare import default_compare_config

SIZES = {
    # hidden, heads, mlp, layers, seq, batch, pieces, pretrain steps, extra, lr
    "tiny": (64, 4, 256, 2, 64, 16, 2000, 200, 0.5, 1e-3),
    "full": (128, 4, 512, 4, 128, 16, 2000, 600, 0.5, 1e-3),
}
EXPERTS = 8
DOMAINS = {
    "library": {"data": {"include_documents": ["library/*"]}},
    "guides": {"data": {"exclude_documents": ["library/*"]}},
}


def get_config(arg=None):
    size = arg or "full"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    hidden, heads, mlp, layers, seq, batch, pieces, steps, extra, lr = SIZES[size]
    c = default_compare_config()
    t = c.train
    t.model = ml_collections.ConfigDict(
        {
            "family": "decoder",
            "name": "tiny",
            "overrides": {
                "vocab_size": pieces,
                "hidden_size": hidden,
                "intermediate_size": mlp,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "max_position_embeddings": seq,
            },
            "moe": {  # Mixtral's routing (configs/llama_moe_8x_top2.py), every other layer
                "router": "top_k",
                "k": 2,
                "ordering": "topk_then_softmax",
                "capacity_factor": None,  # dropless
                "eval_capacity_factor": None,
                "layers": "every_other",
                "aux_loss_weight": 0.01,
                "router_z_loss_weight": 0.001,
            },
        }
    )
    t.data = ml_collections.ConfigDict(
        {"name": "text", "vocab_size": pieces, "seq_len": seq, "batch_size": batch, "seed": 0}
    )
    t.loss = ml_collections.ConfigDict({"z_loss": 1e-4, "label_smoothing": 0.0})
    t.eval_steps = 20
    t.log_every = 50
    t.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 1, "async": True})
    set_schedules(c, lr, steps)  # warmup-stable-decay: see configs/_compare_common.py
    c.upcycle = ml_collections.ConfigDict(
        {
            "method": "copy",
            "num_experts": EXPERTS,
            "router_init_std": 0.02,
            "k": 2,
            "ordering": "topk_then_softmax",
        }
    )
    c.extra_compute = extra
    c.num_points = 4
    c.seeds = [0, 1, 2]
    c.arms = ml_collections.ConfigDict(
        {
            "dense": {"kind": "dense", "overrides": {}},
            "upcycled": {"kind": "upcycle", "overrides": {}},
            "btx": {
                "kind": "btx",
                "branches": DOMAINS,
                "branch_compute": 0.5,
                "overrides": {},
            },
        }
    )
    return c
