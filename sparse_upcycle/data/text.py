"""English text for T5 (span corruption) and decoder-only (packed LM) models.

Corpus, splits, vocabulary, cached token streams and document selection: ``corpus.py``.

* **Sentinels** follow T5: the model vocabulary is ``pieces + extra_ids`` and sentinel ``k``
  (``<extra_id_k>``) is id ``pieces + extra_ids - 1 - k``.
* **Span corruption** (T5, Raffel et al. 2020, JMLR 21(140), §3.1.4 and §3.3.4; formulas from
  ``t5.data.preprocessors.random_spans_helper`` / ``random_spans_noise_mask``, re-written here
  in numpy): example ``i`` is the raw chunk ``stream[i·L : (i+1)·L]``, where ``L`` is the
  largest length whose corrupted input, with EOS, fits ``seq_len``. In a chunk of ``L`` tokens
  ``round(L·noise_density)`` are noise, in ``round(noise / mean_noise_span_length)`` spans;
  non-noise and noise spans alternate, starting with non-noise, and all such masks are equally
  likely. Each noise span becomes one sentinel in the input (sentinels 0, 1, … in order); the
  target is each span's sentinel followed by the span. Both end with EOS and are padded with 0.
  Unlike T5 (which splits documents), chunks run across document boundaries (EOS between).
  T5's ``noise_density == 0.5`` length hack is left out, so the input is always ``seq_len``.
* **Packed LM**: example ``i`` is the window ``w = stream[i·S : i·S + S + 1]``; tokens
  ``w[:-1]``, targets ``w[1:]``, all weights 1.

Randomness: the train split is shuffled (a new permutation each epoch) and corrupted with the
generator grain derives from ``seed`` and the example's position in the repeated stream (see
``pipeline.py``); validation and test are neither shuffled nor re-drawn: example ``i`` is
corrupted with ``numpy.random.default_rng([seed, split_id, i])`` inside the source, so every
evaluation sees the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from sparse_upcycle import models
from sparse_upcycle.data.corpus import (
    CORPUS_DIR,
    EOS_ID,
    PAD_ID,
    SPLITS,
    default_cache_dir,
    prepare_corpus,
    select_documents,
)
from sparse_upcycle.data.pipeline import GrainPipeline

# The ``data`` fields make_text_pipeline reads (besides name, batch_size, seed).
DATA_FIELDS = frozenset(
    {
        "vocab_size",
        "extra_ids",
        "seq_len",
        "target_len",
        "noise_density",
        "mean_noise_span_length",
        "corpus_dir",
        "cache_dir",
        "include_documents",
        "exclude_documents",
    }
)


class TokenStream(Protocol):
    """A 1-D token sequence read by contiguous slices: a numpy array (a cached split) or
    ``token_shards.ShardedStream`` (the concatenation of memory-mapped shards)."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice, /) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------
# T5 span corruption
# ----------------------------------------------------------------------------------------------


def _span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in ``length`` tokens, with T5's guards against degeneracy."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def random_spans_helper(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(raw tokens per example, targets length) so that the corrupted input plus EOS is
    exactly ``inputs_length`` long; the targets length counts sentinels and EOS."""

    def lengths(tokens: int) -> tuple[int, int]:
        noise, spans = _span_counts(tokens, noise_density, mean_noise_span_length)
        return tokens - noise + spans + 1, noise + spans + 1

    if inputs_length < 3 or not 0 < noise_density < 1:
        raise ValueError(f"no span corruption of {inputs_length} tokens at density {noise_density}")
    tokens = inputs_length - 1
    # Growing the chunk by one token grows the input by 0 or 1, so this stops at equality.
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    return tokens, lengths(tokens)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` non-empty
    parts: choose ``num_segments - 1`` of the ``num_items - 1`` gaps as cuts."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean ``[length]`` mask, True on noise: alternating non-noise/noise spans, starting with
    non-noise, with T5's counts (``_span_counts``); all such masks are equally likely."""
    if noise_density == 0.0:
        return np.zeros(length, bool)
    padded = max(length, 2)  # as T5: avoid degenerate counts, then cut back
    num_noise, num_spans = _span_counts(padded, noise_density, mean_noise_span_length)
    noise = _random_segmentation(num_noise, num_spans, rng)
    nonnoise = _random_segmentation(padded - num_noise, num_spans, rng)
    span_lengths = np.stack([nonnoise, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), span_lengths)[:length]


def span_corrupt(
    tokens: np.ndarray,
    noise_mask: np.ndarray,
    first_sentinel: int,
    inputs_len: int,
    targets_len: int,
    eos_id: int = EOS_ID,
) -> dict[str, np.ndarray]:
    """T5 model features of one raw chunk; noise span ``k`` becomes ``first_sentinel - k``;
    inputs and targets end with ``eos_id`` and are padded with ``PAD_ID``."""
    tokens = np.asarray(tokens, np.int32)
    span_start = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
    sentinel = first_sentinel - (np.cumsum(span_start) - 1)
    inputs = np.where(span_start, sentinel, tokens)[~noise_mask | span_start]
    noise_pos = np.flatnonzero(noise_mask)
    targets = np.insert(
        tokens[noise_pos], np.flatnonzero(span_start[noise_pos]), sentinel[span_start]
    )

    def finish(seq: np.ndarray, length: int, name: str) -> np.ndarray:
        seq = np.append(seq, eos_id).astype(np.int32)
        if seq.size > length:
            raise ValueError(f"{name} need {seq.size} tokens but have room for {length}")
        return np.pad(seq, (0, length - seq.size))

    targets = finish(targets, targets_len, "targets")
    return {
        "encoder_input_tokens": finish(inputs, inputs_len, "inputs"),
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.concatenate([[0], targets[:-1]]).astype(np.int32),
        "decoder_loss_weights": (targets != PAD_ID).astype(np.float32),
    }


# ----------------------------------------------------------------------------------------------
# Random-access sources and the pipeline
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PackedLMSource:
    """Next-token prediction over consecutive windows of a token stream."""

    stream: TokenStream
    seq_len: int

    def __len__(self) -> int:
        return max(len(self.stream) - 1, 0) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = self.seq_len
        w = np.asarray(self.stream[i * s : i * s + s + 1], np.int32)
        return {"tokens": w[:-1], "targets": w[1:], "weights": np.ones(s, np.float32)}


@dataclasses.dataclass
class SpanCorruptionSource:
    """Raw chunks of a stream; with ``eval_seed`` set they come already corrupted (fixed rng
    per example), otherwise ``corrupt`` is the pipeline's random transform."""

    stream: TokenStream
    seq_len: int
    target_len: int
    tokens_length: int
    noise_density: float
    mean_noise_span_length: float
    first_sentinel: int
    eval_seed: tuple[int, int] | None = None
    eos_id: int = EOS_ID

    def __len__(self) -> int:
        return len(self.stream) // self.tokens_length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = self.tokens_length
        example = {"tokens": np.asarray(self.stream[i * n : (i + 1) * n], np.int32)}
        if self.eval_seed is None:
            return example
        return self.corrupt(example, np.random.default_rng([*self.eval_seed, i]))

    def corrupt(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = example["tokens"]
        mask = random_spans_noise_mask(
            tokens.size, self.noise_density, self.mean_noise_span_length, rng
        )
        return span_corrupt(
            tokens, mask, self.first_sentinel, self.seq_len, self.target_len, self.eos_id
        )


def make_text_pipeline(
    data_config,
    family: str,
    model_config,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> GrainPipeline:
    """The text pipeline of ``split`` for model ``family``: span corruption for a ``seq2seq``
    family (T5), packed language-model sequences for an ``lm`` one (decoder).

    ``data_config`` fields (defaults): vocab_size (8000 SentencePiece pieces), extra_ids (100,
    T5 only), seq_len (512), target_len (computed), noise_density (0.15),
    mean_noise_span_length (3.0), corpus_dir (``CORPUS_DIR``), cache_dir (env
    ``SPARSE_UPCYCLE_CACHE`` or ~/.cache/sparse_upcycle), include_documents and
    exclude_documents (none: every document; see the module docstring), seed (0), batch_size.
    """
    get = data_config.get
    check_text_model(data_config, family, model_config, split)
    entry = corpus_entry(data_config)
    stream, _ = select_documents(
        entry, split, get("include_documents", None), get("exclude_documents", None)
    )
    return stream_pipeline(
        stream,
        data_config,
        family,
        model_config,
        split,
        where=str(entry),
        process_index=process_index,
        process_count=process_count,
    )


def corpus_entry(data_config):
    """The cache entry (``corpus.prepare_corpus``) of the run's corpus and vocabulary."""
    get = data_config.get
    return prepare_corpus(
        get("corpus_dir", None) or CORPUS_DIR,
        int(get("vocab_size", 8000)),
        get("cache_dir", None) or default_cache_dir(),
    )


def check_text_model(data_config, family: str, model_config, split: str) -> None:
    """ValueError unless ``family`` reads text and its vocabulary holds the text's."""
    task = models.get(family).TASK
    if task not in ("seq2seq", "lm"):
        raise ValueError(
            f"text data is for seq2seq and language-model families, not {family!r} ({task})"
        )
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    pieces = int(data_config.get("vocab_size", 8000))
    extra_ids = int(data_config.get("extra_ids", 100)) if task == "seq2seq" else 0
    needed = pieces + extra_ids
    if model_config.vocab_size < needed:
        raise ValueError(
            f"model vocab_size {model_config.vocab_size} is smaller than the text vocabulary "
            f"({pieces} SentencePiece pieces + {extra_ids} sentinels = {needed})"
        )


def stream_pipeline(
    stream: TokenStream,
    data_config,
    family: str,
    model_config,
    split: str,
    *,
    where: str,
    process_index: int = 0,
    process_count: int = 1,
) -> GrainPipeline:
    """The pipeline of ``make_text_pipeline`` over a token stream already in hand (``where``
    names it in errors): the train split shuffled, the others fixed."""
    get = data_config.get
    task = models.get(family).TASK
    needed = int(get("vocab_size", 8000)) + (int(get("extra_ids", 100)) if task == "seq2seq" else 0)
    seed, seq_len = int(get("seed", 0)), int(get("seq_len", 512))
    shuffle_seed = seed if split == "train" else None
    transform = None
    if task == "lm":
        source = PackedLMSource(stream, seq_len)
    else:
        density = float(get("noise_density", 0.15))
        mean_span = float(get("mean_noise_span_length", 3.0))
        tokens_length, needed_targets = random_spans_helper(seq_len, density, mean_span)
        target_len = get("target_len", None) or needed_targets
        if needed_targets > target_len:
            raise ValueError(
                f"span corruption of seq_len {seq_len} needs target_len >= {needed_targets}, "
                f"got {target_len}"
            )
        source = SpanCorruptionSource(
            stream,
            seq_len,
            int(target_len),
            tokens_length,
            density,
            mean_span,
            first_sentinel=needed - 1,
            eval_seed=None if split == "train" else (seed, SPLITS[split]),
        )
        if split == "train":
            transform = source.corrupt
    if len(source) == 0:
        raise ValueError(
            f"the {split} split of {where} has {len(stream)} tokens, too few for one example"
        )
    return GrainPipeline(
        source,
        int(data_config.batch_size),
        process_index=process_index,
        process_count=process_count,
        shuffle_seed=shuffle_seed,
        transform=transform,
        transform_seed=seed,
    )
