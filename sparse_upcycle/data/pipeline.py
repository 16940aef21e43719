"""Batches of a random-access source through grain, with per-process sharding and a JSON state.

``GrainPipeline`` builds one ``grain.MapDataset`` chain:

    source -> shuffle (a new permutation each epoch) -> repeat -> [random_map] -> batch(B / P)
           -> take batch n·P + p

so process ``p`` of ``P`` gets rows ``p·B/P … (p+1)·B/P - 1`` of global batch ``n``, exactly the
rows a single process would put there (multi-host runs see the same global batches as one
host). Every step of the chain is random access, so the pipeline's whole state is the index of
its next batch, ``{"next_batch": n}``, which the trainer saves as JSON beside each checkpoint.
A per-example random transform (span corruption) gets a ``numpy.random.Generator`` that grain
derives from the seed and the example's position in the repeated stream, so an example is
corrupted differently in each epoch but identically on resume.

Validation and test pipelines are neither shuffled nor randomly transformed per epoch:
their batch ``n`` is the same in every evaluation, for every arm of an experiment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np


class DataUnavailable(ValueError):
    """A data set's files are missing; the message says which package installs them."""


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class GrainPipeline:
    """This process's rows of each global batch of ``source`` (any ``len``/``__getitem__``)."""

    def __init__(
        self,
        source,
        global_batch: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        shuffle_seed: int | None = None,
        transform: Callable[[dict, np.random.Generator], dict] | None = None,
        transform_seed: int = 0,
    ):
        if global_batch % process_count:
            raise ValueError(
                f"global batch {global_batch} is not divisible by {process_count} processes"
            )
        if len(source) == 0:
            raise ValueError("the data source is empty")
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.process_count = process_count
        vectorised = transform is None and getattr(source, "batch_indexing", False)
        # A source with ``batch_indexing`` takes an index array and returns the whole batch
        # (numpy fancy indexing), so a batch costs one gather, not B Python calls: the chain
        # then shuffles and batches the indices, the same permutation as shuffling the rows.
        # Elements are indices or rows here, batches below: the chain is typed loosely.
        ds: grain.MapDataset[Any]
        ds = grain.MapDataset.range(len(source)) if vectorised else grain.MapDataset.source(source)
        if shuffle_seed is not None:
            ds = ds.shuffle(seed=shuffle_seed)
        ds = ds.repeat(None)
        if transform is not None:
            ds = ds.random_map(transform, seed=transform_seed)
        self.dataset: grain.MapDataset[dict[str, np.ndarray]]
        if vectorised:
            self.dataset = ds.batch(self.local_batch, batch_fn=np.asarray).map(source.__getitem__)
        else:
            self.dataset = ds.batch(self.local_batch, batch_fn=_stack)
        self.next_batch = 0

    def get_state(self) -> dict:
        return {"next_batch": int(self.next_batch)}

    def set_state(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.dataset[self.next_batch * self.process_count + self.process_index]
        if batch is None:  # grain's "filtered out"; this chain has no filter
            raise RuntimeError(f"batch {self.next_batch} is missing from the grain dataset")
        self.next_batch += 1
        return batch
