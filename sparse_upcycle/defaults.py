"""The defaults of every run config field (``train``) and of ``compare``'s fields.

Experiment configs start from these (``configs/*.py``) and ``config.load_config`` checks a
config against them (unknown fields and wrong types are refused). They live below the commands
so the config checker, ``train`` and ``compare`` all read them without importing each other.
"""

from __future__ import annotations

import ml_collections

from sparse_upcycle import optim


def default_config() -> ml_collections.ConfigDict:
    """Every training field with its default; experiment configs start from this."""
    c = ml_collections.ConfigDict()
    # remat: none | full | dots_saveable | minimal, per block (models/remat.py); scan_layers:
    # the blocks run as one jax.lax.scan (models/scan.py); param_dtype: of the train state's
    # parameters (training.py)
    c.model = ml_collections.ConfigDict(
        {
            "family": "t5",
            "name": "tiny",
            "remat": "none",
            "scan_layers": False,
            "param_dtype": "float32",
            "overrides": {},
        }
    )
    c.init_from = "scratch"  # "scratch" | a dense checkpoint | an `upcycle` output directory
    c.init_format = "auto"
    # "reset" | "carry": a dense continuation takes init_from's optimizer state (a `train`
    # checkpoint of this model and optimizer; init_from.check_carry)
    c.init_opt_state = "reset"
    c.seed = 0
    c.total_steps = 100
    # fsdp > 1 (or shard_params_over_data) splits params and optimizer state (sharding.py)
    c.mesh = ml_collections.ConfigDict(
        {"data": -1, "fsdp": 1, "expert": 1, "model": 1, "shard_params_over_data": False}
    )
    c.distributed = ml_collections.ConfigDict(
        {"num_processes": 1, "process_id": 0, "coordinator_address": ""}
    )
    c.data = ml_collections.ConfigDict(
        {"name": "synthetic", "batch_size": 16, "seq_len": 32, "target_len": 8, "seed": 0}
    )
    c.optimizer = optim.default_optimizer_config("adafactor")
    c.loss = ml_collections.ConfigDict({"z_loss": 1e-4, "label_smoothing": 0.0})
    c.log_every = 10
    c.eval_every = 100  # <= 0: only at eval_at and at the end
    c.eval_at = []  # extra steps to evaluate at (matched compute points of `compare`; 0: the
    # initial parameters, before the first step)
    c.eval_steps = 4
    # few-shot linear probes on pre-logit features at every evaluation (fewshot.py); off
    # while dataset is ""
    c.fewshot = ml_collections.ConfigDict(
        {
            "dataset": "",
            "shots": [1, 5, 10, 25],
            "seeds": 3,
            "l2_grid": [4.0**k for k in range(-3, 8)],
        }
    )
    # fine-tuning on a downstream task at the end of the run (finetune_eval.py); off while
    # task is ""
    c.finetune = ml_collections.ConfigDict(
        {
            "task": "",
            "corpus_dir": "",  # "": the interpreter's standard library
            "steps": 100,
            "warmup_steps": 10,
            "learning_rate": 3e-4,
            "batch_size": 16,
            "eval_batches": 8,
            "every_eval": False,
        }
    )
    c.checkpoint = ml_collections.ConfigDict({"every": 100, "keep": 3, "async": True})
    c.peak_flops = ml_collections.FieldReference(None, field_type=float)  # None: measure it
    return c


def default_compare_config() -> ml_collections.ConfigDict:
    """Every ``compare`` field with its default; ``configs/compare_*.py`` start from this."""
    c = ml_collections.ConfigDict()
    c.train = default_config()  # shared by all runs: model (dense), data, loss, eval, mesh
    c.train.eval_every = 0
    # eval_every > 0: the pre-training curve (report.png's third panel); 0: its end only
    c.pretrain = ml_collections.ConfigDict(
        {"steps": 1000, "optimizer": c.train.optimizer, "eval_every": 0}
    )
    # "restart": every arm its own schedule (train.optimizer, decayed over the arm's length);
    # "continue": the paper's, every arm goes on with the pre-training schedule (compare.py)
    c.protocol = "restart"
    c.dense_checkpoint = ""  # reuse this dense checkpoint instead of pre-training
    c.dense_checkpoint_format = "auto"
    c.upcycle = ml_collections.ConfigDict({"method": "copy", "num_experts": 8})
    c.extra_compute = 0.5  # the extra budget, as a fraction of the dense pre-training FLOPs
    c.num_points = 4
    c.seeds = [0, 1, 2]
    c.arms = ml_collections.ConfigDict(
        {
            "dense": {"kind": "dense", "overrides": {}},
            "upcycled": {"kind": "upcycle", "overrides": {}},
            "moe_scratch": {"kind": "scratch", "overrides": {}},
        }
    )
    return c
