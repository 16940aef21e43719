"""Downstream evaluation of a language model by fine-tuning: the checkpoint is trained on to a
task it has not seen and scored there, as the paper scores its language models by fine-tuning
them (Komatsuzaki et al. 2023, §4.1: SuperGLUE after fine-tuning).

Run config block ``finetune`` (off while ``task`` is empty): at the end of the run (or at
every evaluation with ``every_eval``) ``train`` fine-tunes a copy of the parameters and adds
``finetune/<task>_loss`` and ``finetune/<task>_accuracy`` (held-out next-token loss and
accuracy, or span-corruption ones for T5), so ``compare`` reports them for every arm.

Task ``python_stdlib``: the Python source of the interpreter's own standard library, a domain
the documentation corpus (``data/corpus.py``) describes but does not contain. Documents: every
``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` except those below a ``test``,
``tests``, ``idle_test``, ``site-packages`` or ``dist-packages`` directory (734 files, 12 MB
for CPython 3.11.7), split by the corpus's path hash (buckets 0-4 validation) and encoded with
the run's own vocabulary, so no token id changes meaning. Nothing is downloaded.
``corpus_dir`` reads another tree of ``*.py`` files instead (tests use a small one).

Fine-tuning: ``steps`` AdamW updates (b1 0.9, b2 0.999, no weight decay) of every parameter
on the run's own objective (auxiliary MoE losses included), the rate rising linearly over
``warmup_steps`` to ``learning_rate`` and falling to 0 by a cosine; batches of
``batch_size`` windows of the run's ``data.seq_len`` tokens, the train files shuffled with the
run's ``data.seed``, the same batches at every evaluation of a run. The score is the mean over
``eval_batches`` fixed validation batches. The run's own parameters and optimizer state are
left as they were.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sparse_upcycle.config import ConfigError
from sparse_upcycle.data import corpus, text
from sparse_upcycle.data.pipeline import DataUnavailable
from sparse_upcycle.training import make_eval_step, make_train_step, mean_scores

TASKS = ("python_stdlib",)
STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


def stdlib_dir() -> pathlib.Path:
    """The running interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def task_entry(data_config, task: str, corpus_dir: str = "") -> pathlib.Path:
    """The cache entry of ``task``'s documents (under ``corpus_dir``, default
    ``stdlib_dir()``) encoded with the run's vocabulary."""
    vocab = text.corpus_entry(data_config)
    cache = data_config.get("cache_dir", None) or corpus.default_cache_dir()
    return corpus.prepare_corpus(
        corpus_dir or stdlib_dir(),
        int(data_config.get("vocab_size", 8000)),
        cache,
        pattern="*.py",
        skip_dirs=STDLIB_SKIP,
        vocab_from=vocab,
    )


def _block(config) -> dict:
    block = config.get("finetune")
    if isinstance(block, ml_collections.ConfigDict):
        return block.to_dict()
    return dict(block or {})


@dataclasses.dataclass(frozen=True)
class Finetune:
    """``run(params) -> {"finetune/<task>_loss", "finetune/<task>_accuracy", …_seconds}``;
    ``every_eval``: at every evaluation, not only the run's last."""

    run: Callable[[dict], dict]
    every_eval: bool


def make_finetune(config, t, to_device: Callable[[dict], dict]) -> Finetune | None:
    """The evaluator of the run's ``finetune`` block, or None when it is off. The settings,
    the model family and the data are checked, and the task's documents encoded, before
    training starts."""
    block = _block(config)
    task = block.get("task", "")
    if not task:
        return None
    if task not in TASKS:
        raise ConfigError(f"finetune.task must be one of {TASKS} or '', got {task!r}")
    if config.data.get("name") != "text":
        raise ConfigError(
            "finetune reads its task with the run's vocabulary, which only data.name='text' "
            f"has; got data.name={config.data.get('name')!r}"
        )
    try:
        steps = int(block.get("steps", 100))
        warmup = int(block.get("warmup_steps", 10))
        rate = float(block.get("learning_rate", 3e-4))
        batch_size = int(block.get("batch_size", 16))
        eval_batches = int(block.get("eval_batches", 8))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"finetune: {e}") from None
    if steps < 1 or not 0 <= warmup <= steps or rate <= 0 or batch_size < 1 or eval_batches < 1:
        raise ConfigError(
            "finetune needs steps >= 1, 0 <= warmup_steps <= steps, learning_rate > 0, "
            f"batch_size >= 1 and eval_batches >= 1; got steps={steps}, warmup_steps={warmup}, "
            f"learning_rate={rate}, batch_size={batch_size}, eval_batches={eval_batches}"
        )
    spec = t.spec
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.batch_size = batch_size
    try:
        text.check_text_model(data, spec.family, spec.config, "train")
        entry = task_entry(data, task, str(block.get("corpus_dir", "") or ""))
        streams = {s: corpus.load_stream(entry, s) for s in ("train", "validation")}

        def pipeline(split):
            return text.stream_pipeline(
                streams[split],
                data,
                spec.family,
                spec.config,
                split,
                where=str(entry),
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )

        for split in streams:  # too few tokens: refused now, not at the run's end
            pipeline(split)
    except (ValueError, DataUnavailable) as e:
        raise ConfigError(f"finetune.task {task!r}: {e}") from None

    schedule = optax.warmup_cosine_decay_schedule(0.0, rate, warmup, steps, 0.0)
    tx = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=0.0)
    step_fn = jax.jit(make_train_step(t.loss_fn, tx, schedule, t.bias_updates))

    # readable on every process
    eval_jit = jax.jit(make_eval_step(t.loss_fn), out_shardings=t.replicated)
    init_jit = jax.jit(tx.init)
    seed = np.int32(config.get("seed", 0))

    def run(params) -> dict:
        start = time.perf_counter()
        # the run's arrays are only read: nothing is donated, so they stay as they were
        state = {"params": params, "opt_state": init_jit(params), "step": jnp.int32(0)}
        train = pipeline("train")
        for _ in range(steps):
            state, _ = step_fn(state, to_device(next(train)), seed)
        valid = pipeline("validation")
        outs = [eval_jit(state["params"], to_device(next(valid))) for _ in range(eval_batches)]
        loss, accuracy = mean_scores(outs)
        return {
            f"finetune/{task}_loss": loss,
            f"finetune/{task}_accuracy": accuracy,
            f"finetune/{task}_seconds": time.perf_counter() - start,
        }

    return Finetune(run, bool(block.get("every_eval", False)))
