r"""T5 v1.1 Base: sparse upcycling to 32 experts (Komatsuzaki et al. 2023, §3-4).

Every other MLP of the encoder and the decoder becomes 32 copies of itself behind a fresh router
(expert choice C = 2 in the encoder, top-2 in the decoder), upcycled in memory from the dense
checkpoint (online; ``sparse-upcycle upcycle`` + ``init_from=<its output>`` is the offline
equivalent); fresh optimizer state; the dense rsqrt schedule continues from step 1M. Settings,
their sources and what could not be confirmed: ``configs/_t5_common.py``.

Paper scale, on a TPU v4-64 slice (mesh ``data=-1, expert=8``; launchers in ``scripts/``):

    gsutil -m cp -r gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000 \
        /data/t5_1_1_base/
    sparse-upcycle tokenize --src /data/c4_text \
        --tokenizer /data/t5_tokenizer/tokenizer.json --out /data/shards/c4_t5
    sparse-upcycle train --config configs/t5_base_upcycle.py \
        --config.init_from=/data/t5_1_1_base/checkpoint_1000000 \
        --config.data.path=/data/shards/c4_t5 --workdir WORKDIR

``init_from`` is left empty on purpose: without ``--config.init_from`` the run stops with
"config.init_from is not set". The paper upcycled a Base checkpoint it pre-trained itself (not
public); the public T5 1.1 Base checkpoint stands in for it.

Data: C4 (or any corpus) as token shards (``data.name = "token_shards"``,
``sparse_upcycle/data/token_shards.py``), tokenised with T5's ``tokenizer.json`` (HF
``t5-base``'s: 32,100 ids, the SentencePiece vocabulary T5 1.1 shares, ``</s>`` after every
document, sentinels ``<extra_id_k>`` = 32099 - k, padding 0), span-corrupted as in the paper's
C4 task (noise density 0.15, mean span 3: inputs 512, targets 114). ``data.path`` is empty on
purpose: without it the run stops with "data.path is not set". A ``--src`` with ``train/``
and ``validation/`` sub-directories keeps a corpus's own split: move C4's JSON-lines release
(``c4-train.*.json.gz``, ``c4-validation.*.json.gz``) into them; their ``text`` field is read
as is. ``--config.data.tokenizer=<tokenizer.json>`` makes the run check the shards' tokenizer.
The other T5 configs still name ``data.name = "c4_v220_span_corruption"``, which stops the run
at start-up with "unknown data.name"; the same two ``data`` fields switch them over.

Expected (paper, Figure 2 and §4.2; not run here): a small initial quality drop, then better C4
span-corruption accuracy than dense continuation at equal extra compute, and better than the MoE
from scratch (``t5_base_moe_scratch.py``) for budgets under ~100% of the dense run.

Tiny variant (``:tiny``, identical for base/large/xl; synthetic data, CPU):

    sparse-upcycle train --config configs/t5_base_dense_continue.py:tiny \
        --config.init_from=scratch --config.optimizer.step_offset=0 \
        --config.total_steps=300 --workdir /tmp/t5_dense
    sparse-upcycle train --config configs/t5_base_upcycle.py:tiny \
        --config.init_from=/tmp/t5_dense/checkpoints/300 --workdir /tmp/t5_upcycle

Expected (measured on 2 CPU cores, 1 device): 11-13 s each. The first step's train
cross-entropy (``--config.total_steps=1``) is 0.7210 upcycled against the dense model's
0.7264 on the same batch: close, not equal, since the paper's routers do not compute
the dense function (expert choice gives a token 0 to 4 experts, the weights are not
normalised, and ``router/dropped_fraction`` is 0.043). Then eval loss 0.405 at +100
and 0.205 (accuracy 0.95) at +200 steps, below dense continuation's 0.426 and 0.260
(``t5_base_dense_continue.py``).
"""

import ml_collections
from _t5_common import t5_experiment

_experiment = t5_experiment("base", "upcycle")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _experiment(arg)
    if arg is None:  # paper scale: the shared C4 settings, read from token shards
        c.data.name = "token_shards"
        with c.data.unlocked():
            c.data.path = ""  # "": the pipeline asks for the shard directory
            c.data.tokenizer = ""
    return c
