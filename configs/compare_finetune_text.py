r"""Downstream evaluation of the language models by fine-tuning, as the paper evaluates its
T5 models (Komatsuzaki et al. 2023, §4.1): does an upcycled model's standing against dense
continuation change once both are fine-tuned on a task neither was trained on?

    sparse-upcycle compare --config configs/compare_finetune_text.py:tiny --workdir /tmp/cmp_ft_tiny
    sparse-upcycle compare --config configs/compare_finetune_text.py --workdir /tmp/cmp_ft

Upstream as ``configs/compare_btx_text.py`` (a Llama-style decoder on the Python docs, d=128,
4 layers, 600 dense pre-training steps, +50% per arm, 3 seeds, 4 matched points). Downstream
(``sparse_upcycle/finetune_eval.py``): at the end of every run, the dense checkpoint's
included, a copy of the model is fine-tuned for 200 AdamW steps (peak 3e-4, 20 warmup, cosine
to 0, batch 16 windows of 128 tokens) on the Python source of the interpreter's standard
library, and scored on its held-out files (next-token loss and accuracy over 8 batches).

Arms:

* ``dense``: dense continuation.
* ``upcycled``: 8 copies of the MLP in every other layer, Mixtral routing (top-2, softmax
  over the picked two, dropless); it starts as the dense function.
* ``upcycled_top1``: the same with one expert per token, so a step costs what a dense step
  costs (the cheapest routing, ahead of top-2 in the paper-protocol runs).

Sizes (2-core CPU): ``:tiny`` d=64, 2 layers, seq 64, 200 dense steps, 20 fine-tuning steps;
the default as above. Results in the README ("Downstream: fine-tuned on the standard library").
"""

import ml_collections
from compare_btx_text import get_config as btx_config

FINETUNE_STEPS = {"tiny": 20, "full": 200}


def get_config(arg=None):
    c = btx_config(arg)  # refuses unknown sizes
    steps = FINETUNE_STEPS[arg or "full"]
    c.train.finetune.task = "python_stdlib"
    c.train.finetune.steps = steps
    c.train.finetune.warmup_steps = steps // 10
    c.train.finetune.learning_rate = 3e-4
    c.train.finetune.batch_size = 16
    c.train.finetune.eval_batches = 8
    top1 = {"model": {"moe": {"k": 1}}, "upcycle": {"k": 1}}
    c.arms = ml_collections.ConfigDict(
        {
            "dense": {"kind": "dense", "overrides": {}},
            "upcycled": {"kind": "upcycle", "overrides": {}},
            "upcycled_top1": {"kind": "upcycle", "overrides": top1, "against": ["upcycled"]},
        }
    )
    return c
