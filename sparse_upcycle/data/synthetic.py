"""Deterministic synthetic tasks that a model can learn, for tests, tiny configs and benchmarks.

Example ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s, i])`` alone, so
any process can build any slice of any batch without coordination, and a pipeline's whole
state is the index of its next batch. The tasks have learnable structure (so losses fall and
comparisons mean something) but are no substitute for real data (``data/`` grows real
pipelines with the experiment issue):

* ``lm`` (decoder): token sequences from a fixed sparse first-order Markov chain over the
  vocabulary (each token has ``branching`` likely successors).
* ``seq2seq`` (T5): inputs are Markov sequences; the target is the input's first
  ``target_len`` tokens passed through a fixed permutation of the vocabulary.
* ``images`` (ViT): each class has a fixed random template; an example is its class template
  plus Gaussian noise.

Token 0 is padding (never generated); T5's decoder inputs are the targets shifted right with 0
as the start token, as in T5X.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from sparse_upcycle import models

SPLITS = {"train": 0, "validation": 1, "test": 2}
TASKS = models.TASKS
# The ``data`` fields make_synthetic_pipeline reads (besides name, batch_size, seed).
DATA_FIELDS = frozenset({"noise", "seq_len", "target_len", "branching"})


@dataclasses.dataclass
class SyntheticSource:
    """Random-access examples of one task and split."""

    task: str
    split: str
    seed: int = 0
    vocab_size: int = 128
    seq_len: int = 32
    target_len: int = 8
    branching: int = 4
    image_shape: tuple[int, int, int] = (28, 28, 1)
    num_classes: int = 10
    noise: float = 1.0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"synthetic task must be one of {sorted(TASKS)}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {self.split!r}")
        world = np.random.default_rng([self.seed, 1_000_003])
        v = self.vocab_size
        # Each token's likely successors (the chain's structure) and the seq2seq permutation.
        self._next = world.integers(1, v, size=(v, self.branching))
        self._perm = np.concatenate([[0], 1 + world.permutation(v - 1)])
        self._templates = world.normal(size=(self.num_classes, *self.image_shape)).astype(
            np.float32
        )

    def _markov(self, rng: np.random.Generator, length: int) -> np.ndarray:
        out = np.empty(length, np.int32)
        out[0] = rng.integers(1, self.vocab_size)
        choices = rng.integers(0, self.branching, size=length)
        for t in range(1, length):
            out[t] = self._next[out[t - 1], choices[t]]
        return out

    def example(self, index: int) -> dict[str, np.ndarray | np.generic]:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        if self.task == "images":
            label = int(rng.integers(0, self.num_classes))
            noise = rng.normal(size=self.image_shape).astype(np.float32)
            return {"image": self._templates[label] + self.noise * noise, "label": np.int32(label)}
        if self.task == "lm":
            seq = self._markov(rng, self.seq_len + 1)
            return {
                "tokens": seq[:-1],
                "targets": seq[1:],
                "weights": np.ones(self.seq_len, np.float32),
            }
        inputs = self._markov(rng, self.seq_len)
        targets = self._perm[inputs[: self.target_len]].astype(np.int32)
        return {
            "encoder_input_tokens": inputs,
            "decoder_input_tokens": np.concatenate([[0], targets[:-1]]).astype(np.int32),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones(self.target_len, np.float32),
        }


class Pipeline:
    """Batches of a random-access source; yields this process's rows of each global batch.

    ``get_state()`` is ``{"next_batch": n}``; batch ``n`` holds examples ``n·B … n·B + B - 1``
    (B = global batch size), and process ``p`` of ``P`` gets rows ``p·B/P … (p+1)·B/P - 1``.
    """

    def __init__(self, source, global_batch: int, process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(
                f"global batch {global_batch} is not divisible by {process_count} processes"
            )
        self.source = source
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self.next_batch = 0

    def get_state(self) -> dict:
        return {"next_batch": int(self.next_batch)}

    def set_state(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.next_batch * self.global_batch + self.offset
        rows = [self.source.example(start + i) for i in range(self.local_batch)]
        self.next_batch += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_synthetic_pipeline(
    data_config,
    family: str,
    model_config,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Pipeline:
    """The pipeline a config's ``data`` block asks for (``name: "synthetic"``), with shapes
    taken from the model config (vocabulary, image size, classes)."""
    task = models.get(family).TASK
    kwargs = dict(task=task, split=split, seed=data_config.get("seed", 0))
    if task == "images":
        h, w = model_config.image_size
        kwargs.update(
            image_shape=(h, w, model_config.num_channels),
            num_classes=model_config.num_classes,
            noise=data_config.get("noise", 1.0),
        )
    else:
        kwargs.update(
            vocab_size=model_config.vocab_size,
            seq_len=data_config.get("seq_len", 32),
            target_len=data_config.get("target_len", 8),
            branching=data_config.get("branching", 4),
        )
    return Pipeline(SyntheticSource(**kwargs), data_config.batch_size, process_index, process_count)
