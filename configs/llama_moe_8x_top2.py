r"""Llama-style decoder upcycled to a Mixtral-style MoE: 8 experts, top-2, every layer.

Not an experiment of Komatsuzaki et al. 2023 (they upcycled T5 and ViT); this applies their
recipe (copy the dense MLP into every expert, fresh router, continue training) to a decoder-only
model with Mixtral's routing (Jiang et al. 2024, §2.1): every MLP block is an MoE layer, each
token goes to its top-2 of 8 experts with weights softmax(top-2 logits) (``topk_then_softmax``).
Since the two weights sum to one and every expert is an exact copy, the upcycled model computes
the dense function at step 0 for every token that is not dropped.

Capacity. The tiny variants are dropless (``capacity_factor = None``, as Mixtral). The full
scale config uses capacity-based top-2 with ``capacity_factor = 2.0`` (``CAPACITY_FACTOR``):
``ceil(2 · 4096 · 2 / 8) = 2048`` slots per expert in each group of 4096 tokens, twice an
expert's average load, so at step 0 (experts identical, a fresh router) few tokens overflow and
``router/dropped_fraction`` shows how many did. Dropless routing is not yet expert-parallel
(issue 17): it sorts a call's assignments together, and ``plan`` of it on 64 GPUs (without
remat) found ~76,000 GiB of temporaries per device; ``--config.model.moe.capacity_factor=None``
gives it back. Vavre et al. 2024 ("Llama 3 Meets MoE", arXiv 2412.09952, Megatron-Core) discuss the
capacity factor of this 8 × top-2 upcycle; their value could not be read here, so 2.0 is my
choice.

Settings and sources:

* dense model: any HF Llama checkpoint directory (``config.json`` + safetensors);
  ``model.name = "checkpoint"`` takes the architecture from its ``config.json``. The default
  targets Llama 2 7B (meta-llama/Llama-2-7b-hf, 32 layers, plain RoPE); ``moe.layers = "all"``
  makes every block an MoE layer, as Mixtral. Llama 3.1/3.2 checkpoints use "llama3" RoPE
  scaling, which the decoder refuses.
* optimizer: AdamW (b1 0.9, b2 0.95, eps 1e-5, weight decay 0.1, gradient clipping 1.0) and a
  cosine decay to 10% of the peak after 1000 warm-up steps: Llama 2's pre-training
  hyperparameters (Touvron et al. 2023, §2.2). The peak 1e-4 (a third of Llama 2 7B's 3e-4,
  for continued training) and the step budget (20k steps of 256 × 4096 tokens, ~21B tokens) are
  my choices, not from a paper. The schedule restarts (no ``step_offset``): the dense run's
  cosine schedule has already decayed.
* optimizer state: reset (HF checkpoints carry none). Router: N(0, 0.02²); load-balancing loss
  0.01 (Switch Transformer's; HF Mixtral's default coefficient is 0.001), router z-loss 0.001
  (ST-MoE).
* target topology: 256 NVIDIA H100 GPUs of 80 GiB (32 nodes of 8); mesh ``data=-1, expert=8,
  model=4`` (data 8). 32 layers × 8 experts × 135M = 35B expert parameters (37.0B in all), split
  8 ways on E and 4 on the MLP width: per GPU 6.28 GiB of float32 parameters and 12.56 GiB of
  AdamW moments. ``plan --devices 256 --hbm 80GiB --config.model.name=llama2-7b`` finds
  48.35 GiB per GPU (29.51 GiB temporaries; budget 72 GiB after 10% headroom); on 64 GPUs each
  holds 16 sequences of 4096 tokens and the temporaries are 107 GiB (no fit): there is no
  gradient accumulation yet. ``docs/plans.md`` has the table.
* data: your corpus as token shards (``data.name = "token_shards"``,
  ``sparse_upcycle/data/token_shards.py``), tokenised with the checkpoint's own
  ``tokenizer.json`` (what its post-processor adds, Llama 2's ``<s>``, before and ``</s>``
  after every document) and packed into windows of 4096 + 1 tokens; the validation split is
  ``--src``'s ``validation/`` sub-directory, or else 5% of its files (a hash of their paths).
  ``data.path`` is empty on purpose: without it the run stops with "data.path is not set";
  ``data.tokenizer`` (optional) makes the run check that the shards were made with that file.

* rematerialisation (full scale only; the tiny variants keep ``none``): ``model.remat =
  "full"`` (``models/remat.py``): a block keeps only its input, since ``dots_saveable`` would
  keep every layer's attention logits, [32 heads, 4096, 4096] per sequence. Not compared with
  the other policies by ``plan`` here.

Paper-scale commands (``init_from`` is empty on purpose: without it the run stops with "config.
init_from is not set"):

    sparse-upcycle tokenize --src /data/my_corpus_text \
        --tokenizer /data/Llama-2-7b-hf/tokenizer.json --out /data/shards/my_corpus
    sparse-upcycle train --config configs/llama_moe_8x_top2.py \
        --config.init_from=/data/Llama-2-7b-hf --config.data.path=/data/shards/my_corpus \
        --config.data.tokenizer=/data/Llama-2-7b-hf/tokenizer.json --workdir WORKDIR

Not run here. Expected: the loss of the first steps equals the dense model's, then falls below
dense continued training as the experts diverge (the T5/ViT finding of Komatsuzaki et al.).

Tiny variants (CPU; decoder "tiny": d=32, f=64, 2 layers, vocabulary 128, synthetic Markov-chain
text, batch 16 × 32 tokens). ``:tiny_dense`` is the dense model for the first step;
``:tiny`` is the 8-expert top-2 MoE of both layers (``moe.layers = "all"``), upcycled from
the trainer's own Orbax step directory (so ``model.name = "tiny"`` instead of ``"checkpoint"``):

    sparse-upcycle train --config configs/llama_moe_8x_top2.py:tiny_dense \
        --config.init_from=scratch --workdir /tmp/llama_dense
    sparse-upcycle train --config configs/llama_moe_8x_top2.py:tiny \
        --config.init_from=/tmp/llama_dense/checkpoints/300 --workdir /tmp/llama_moe

Expected (measured on 2 CPU cores, 1 device): ~8 s each. Dense pre-training: eval loss 1.642
at step 300 (from ln 128 = 4.85; the chain's entropy is at most ln 4 = 1.39 nats). Upcycled:
train cross-entropy of the first step 1.646285, the dense model's on the same batch to all
printed digits (both measured with ``--config.total_steps=1 --config.optimizer.warmup_steps=0``),
then eval loss 1.560 at +100 and 1.464 at +200 steps; dense continuation with the same schedule
(``:tiny_dense --config.init_from=/tmp/llama_dense/checkpoints/300 --config.total_steps=200``)
reaches 1.557 and 1.472.
"""

import ml_collections
from _decoder_common import adamw, full_scale_run, tiny_run

from sparse_upcycle.train import default_config

NUM_EXPERTS = 8
TINY_DENSE_STEPS = 300
TINY_STEPS = 200
# Full scale: 2 x the average load of an expert, ceil(2 * 4096 * 2 / 8) = 2048 slots per group of
# 4096 tokens (routing.top_k_capacity), until dropless routing is expert-parallel (see docstring)
CAPACITY_FACTOR = 2.0


def _moe(layers: str, capacity_factor: float | None) -> dict:
    return {
        "layers": layers,
        "router": "top_k",
        "k": 2,
        "ordering": "topk_then_softmax",
        "renormalize": False,
        "capacity_factor": capacity_factor,  # None: dropless, as Mixtral
        "eval_capacity_factor": None,
        "group_size": 4096,
        "router_init_std": 0.02,
        "aux_loss_weight": 0.01,
        "router_z_loss_weight": 0.001,
    }


def _recipe() -> dict:
    return {
        "method": "copy",
        "num_experts": NUM_EXPERTS,
        "router_init_std": 0.02,
        "seed": 0,
        "noise_std": 0.0,
        "k": 2,
        "ordering": "topk_then_softmax",
        "optimizer": "reset",
        "step": "reset",
    }


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "tiny", "tiny_dense"):
        raise ValueError(f"arg must be empty (full scale), 'tiny' or 'tiny_dense', got {arg!r}")
    c = default_config()
    c.loss = ml_collections.ConfigDict({"z_loss": 0.0, "label_smoothing": 0.0})
    if arg is None:
        c.model = ml_collections.ConfigDict(
            {
                "family": "decoder",
                "name": "checkpoint",
                "remat": "full",  # 4096-token windows: keep only each block's input
                "overrides": {"dtype": "bfloat16"},
                "moe": _moe("all", CAPACITY_FACTOR),
            }
        )
        full_scale_run(c, {"data": -1, "expert": 8, "model": 4})
        adamw(c, peak=1e-4, warmup=1_000)
        c.upcycle = _recipe()
        return c

    c.model = ml_collections.ConfigDict({"family": "decoder", "name": "tiny", "overrides": {}})
    tiny_run(c, TINY_DENSE_STEPS if arg == "tiny_dense" else TINY_STEPS)
    if arg == "tiny":
        c.model.moe = _moe("all", None)
        c.upcycle = _recipe()
    return c
