"""Text pipeline: splits, cached vocabulary, T5 span corruption and packed LM examples."""

import collections
import hashlib
import itertools
import logging
import math
import os
import pathlib

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from sparse_upcycle.data import corpus as text_corpus
from sparse_upcycle.data import text
from sparse_upcycle.data.pipeline import DataUnavailable

PIECES, EXTRA = 150, 20
WORDS = (
    "the a model expert router token layer data train test value function module python "
    "object class method string list dict file import return error sparse dense upcycle "
    "mixture of experts is are was with from into over under small large fast slow new old "
    "and or but not every each some many few first last next good simple clear"
).split()


def _make_corpus(root: pathlib.Path) -> None:
    """A few dozen small English documents, with at least three in each split."""
    rng = np.random.default_rng(0)
    counts = collections.Counter()
    for j in itertools.count():
        rel = f"part{j % 3}/doc{j:03d}.rst.txt"
        split = text_corpus.split_of(rel)
        if counts[split] >= {"train": 30, "validation": 3, "test": 3}[split]:
            if min(counts["validation"], counts["test"]) >= 3 and counts["train"] >= 30:
                break
            continue
        counts[split] += 1
        lines = []
        for _ in range(30):
            words = rng.choice(WORDS, size=rng.integers(6, 14))
            lines.append(" ".join(words).capitalize() + ".")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "ignored.html").write_text("not a .txt document")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    _make_corpus(root)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _configs(corpus, cache, **overrides):
    data = ml_collections.ConfigDict(
        dict(
            vocab_size=PIECES,
            extra_ids=EXTRA,
            seq_len=32,
            batch_size=4,
            seed=3,
            corpus_dir=str(corpus),
            cache_dir=str(cache),
        )
    )
    data.update(overrides)
    # Larger than needed: sentinels must count down from pieces + extra_ids, not from this.
    model = ml_collections.ConfigDict(dict(vocab_size=PIECES + EXTRA + 28))
    return data, model


def _stream(corpus, cache, split):
    return np.asarray(
        text_corpus.load_stream(text_corpus.prepare_corpus(corpus, PIECES, cache), split)
    )


# ------------------------------------------------------------------------------------------------
# Noise mask and lengths
# ------------------------------------------------------------------------------------------------


def _runs(mask):
    """(value, length) of each run of equal values."""
    return [(bool(v), len(list(g))) for v, g in itertools.groupby(mask)]


@pytest.mark.parametrize("length", [34, 37, 100, 568])
def test_noise_mask_counts_follow_t5(length):
    densities = []
    masks = set()
    for seed in range(200):
        mask = text.random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
        assert mask.shape == (length,) and mask.dtype == bool
        num_noise = round(length * 0.15)  # T5: round(length * noise_density)
        assert mask.sum() == num_noise
        runs = _runs(mask)
        noise_runs = [n for v, n in runs if v]
        assert len(noise_runs) == max(round(num_noise / 3.0), 1)
        assert not runs[0][0] and runs[-1][0]  # starts with non-noise, ends with noise
        assert len(runs) == 2 * len(noise_runs)  # strictly alternating
        densities.append(mask.mean())
        masks.add(mask.tobytes())
    assert abs(np.mean(densities) - 0.15) < 0.02
    num_spans = max(round(round(length * 0.15) / 3.0), 1)
    possible = math.comb(round(length * 0.15) - 1, num_spans - 1) * math.comb(
        length - round(length * 0.15) - 1, num_spans - 1
    )
    assert len(masks) > 0.5 * min(possible, 200)  # genuinely random


def test_noise_mask_is_uniform_over_valid_masks():
    # length 10, 3 noise tokens in 2 spans: 2 ways to split the noise, 6 to split the rest.
    counts = collections.Counter(
        text.random_spans_noise_mask(10, 0.3, 1.5, np.random.default_rng(s)).tobytes()
        for s in range(6000)
    )
    assert len(counts) == 12
    assert all(400 < c < 600 for c in counts.values()), counts


def test_random_spans_helper():
    # T5's published span-corruption setting: 512 input tokens <- 568 raw tokens, 114 targets.
    assert text.random_spans_helper(512, 0.15, 3.0) == (568, 114)
    for seq_len in range(12, 300):  # below 12, T5 clamps the counts (at least one span)
        tokens, targets = text.random_spans_helper(seq_len, 0.15, 3.0)
        noise = round(tokens * 0.15)
        spans = round(noise / 3.0)
        assert tokens - noise + spans + 1 == seq_len
        assert noise + spans + 1 == targets
        bigger = round((tokens + 1) * 0.15)
        assert tokens + 1 - bigger + round(bigger / 3.0) + 1 > seq_len


# ------------------------------------------------------------------------------------------------
# Span corruption and packed LM examples
# ------------------------------------------------------------------------------------------------


def _reconstruct(inputs, targets, model_vocab, pieces=PIECES):
    """The raw chunk from (inputs, targets), substituting each sentinel by its span."""
    assert inputs[-1] == text_corpus.EOS_ID
    inputs = inputs[:-1]
    targets = np.trim_zeros(targets, "b")
    assert targets[-1] == text_corpus.EOS_ID
    spans, current = {}, None
    for t in targets[:-1]:
        if t >= pieces:
            current = model_vocab - 1 - t
            spans[current] = []
        else:
            spans[current].append(t)
    out, seen = [], []
    for t in inputs:
        if t >= pieces:
            seen.append(model_vocab - 1 - t)
            out.extend(spans[seen[-1]])
        else:
            out.append(t)
    assert seen == list(range(len(spans)))  # sentinels 0, 1, 2, ... in order
    return np.array(out)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_span_corruption_round_trip(corpus, cache, split):
    data, model = _configs(corpus, cache, target_len=12)
    pipe = text.make_text_pipeline(data, "t5", model, split)
    stream = _stream(corpus, cache, split)
    model_vocab = PIECES + EXTRA
    chunks = []
    for _ in range(3):
        batch = next(pipe)
        assert batch["encoder_input_tokens"].shape == (4, 32)
        assert batch["decoder_target_tokens"].shape == (4, 12)
        assert batch["encoder_input_tokens"].dtype == np.int32
        assert batch["decoder_loss_weights"].dtype == np.float32
        for row in range(4):
            inputs = batch["encoder_input_tokens"][row]
            targets = batch["decoder_target_tokens"][row]
            assert (inputs != 0).all()  # exactly seq_len long: no padding
            sentinels = inputs[inputs >= PIECES]
            np.testing.assert_array_equal(sentinels, model_vocab - 1 - np.arange(len(sentinels)))
            np.testing.assert_array_equal(
                batch["decoder_input_tokens"][row], np.concatenate([[0], targets[:-1]])
            )
            np.testing.assert_array_equal(batch["decoder_loss_weights"][row], targets != 0)
            chunks.append(_reconstruct(inputs, targets, model_vocab))
    length = len(chunks[0])
    assert all(len(c) == length for c in chunks)
    tiles = stream[: len(stream) // length * length].reshape(-1, length)
    if split == "validation":  # not shuffled: example i is the i-th chunk
        np.testing.assert_array_equal(np.stack(chunks), tiles[: len(chunks)])
    else:
        for c in chunks:
            assert (tiles == c).all(axis=1).any()


def test_eval_split_is_the_same_every_time(corpus, cache):
    data, model = _configs(corpus, cache)
    a = next(text.make_text_pipeline(data, "t5", model, "test"))
    b = next(text.make_text_pipeline(data, "t5", model, "test"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_packed_lm(corpus, cache):
    data, model = _configs(corpus, cache, seq_len=16)
    batch = next(text.make_text_pipeline(data, "decoder", model, "validation"))
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    assert (batch["weights"] == 1.0).all() and batch["weights"].dtype == np.float32
    # The stream is the validation documents, each encoded on its own and followed by EOS.
    sp = spm.SentencePieceProcessor(
        model_file=str(text_corpus.prepare_corpus(corpus, PIECES, cache) / "spm.model")
    )
    docs = [
        d for d in text_corpus.list_documents(corpus) if text_corpus.split_of(d) == "validation"
    ]
    expected = np.concatenate([sp.encode((corpus / d).read_text()) + [1] for d in docs])
    np.testing.assert_array_equal(_stream(corpus, cache, "validation"), expected)
    windows = [expected[i * 16 : i * 16 + 17] for i in range(4)]
    np.testing.assert_array_equal(batch["tokens"], [w[:-1] for w in windows])
    np.testing.assert_array_equal(batch["targets"], [w[1:] for w in windows])
    assert (expected == text_corpus.EOS_ID).sum() == len(docs)


@pytest.mark.parametrize(
    "include, exclude, keep",
    [
        (["part0/*"], None, lambda d: d.startswith("part0/")),
        (None, ["part0/*"], lambda d: not d.startswith("part0/")),
        (["part1/*", "part2/*"], ["*/doc00*"], lambda d: d[:5] != "part0" and "/doc00" not in d),
    ],
)
def test_document_selection(corpus, cache, include, exclude, keep):
    """A selection is its documents' own encodings (each + EOS) in path order, in every split,
    with the whole corpus's vocabulary."""
    entry = text_corpus.prepare_corpus(corpus, PIECES, cache)
    sp = spm.SentencePieceProcessor(model_file=str(entry / "spm.model"))
    for split in text_corpus.SPLITS:
        docs = [
            d
            for d in text_corpus.list_documents(corpus)
            if text_corpus.split_of(d) == split and keep(d)
        ]
        if not docs:  # the small corpus has 3 validation and 3 test documents
            with pytest.raises(ValueError, match=f"no {split} document matches"):
                text_corpus.select_documents(entry, split, include, exclude)
            continue
        expected = np.concatenate([sp.encode((corpus / d).read_text()) + [1] for d in docs])
        stream, kept = text_corpus.select_documents(entry, split, include, exclude)
        assert kept == docs
        np.testing.assert_array_equal(stream, expected)
    data, model = _configs(
        corpus, cache, seq_len=16, include_documents=include, exclude_documents=exclude
    )
    batch = next(text.make_text_pipeline(data, "decoder", model, "train"))
    train = [
        d
        for d in text_corpus.list_documents(corpus)
        if text_corpus.split_of(d) == "train" and keep(d)
    ]
    expected = np.concatenate([sp.encode((corpus / d).read_text()) + [1] for d in train])
    windows = {tuple(expected[i * 16 : i * 16 + 16]) for i in range(len(expected) // 16)}
    assert all(tuple(row) in windows for row in batch["tokens"])  # shuffled windows


def test_document_selection_refusals(corpus, cache):
    entry = text_corpus.prepare_corpus(corpus, PIECES, cache)
    with pytest.raises(
        ValueError, match=r"no train document matches include_documents=\['nope/\*'\]"
    ):
        text_corpus.select_documents(entry, "train", ["nope/*"])
    with pytest.raises(ValueError, match="data.exclude_documents must be a list of path patterns"):
        text_corpus.select_documents(entry, "train", None, "part0/*")
    with pytest.raises(ValueError, match="no validation document matches"):
        text_corpus.select_documents(entry, "validation", None, ["*"])


# ------------------------------------------------------------------------------------------------
# Pipeline state and sharding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_resume_and_two_process_sharding(corpus, cache, family):
    data, model = _configs(corpus, cache)
    pipe = text.make_text_pipeline(data, family, model, "train")
    for _ in range(3):
        next(pipe)
    state = pipe.get_state()
    expected = [next(pipe) for _ in range(2)]
    fresh = text.make_text_pipeline(data, family, model, "train")
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])

    whole = text.make_text_pipeline(data, family, model, "train")
    halves = [
        text.make_text_pipeline(data, family, model, "train", process_index=p, process_count=2)
        for p in range(2)
    ]
    for _ in range(3):
        want = next(whole)
        parts = [next(h) for h in halves]
        for k in want:
            assert parts[0][k].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])


# ------------------------------------------------------------------------------------------------
# Cache, vocabulary, errors
# ------------------------------------------------------------------------------------------------


def test_cache_is_reused_and_vocabulary_deterministic(corpus, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="sparse_upcycle.data.corpus"):
        entry = text_corpus.prepare_corpus(corpus, PIECES, tmp_path / "a")
    assert "training a SentencePiece vocabulary of 150 pieces" in caplog.text
    files = sorted(p.name for p in entry.iterdir())
    splits = ("test", "train", "validation")
    assert files == [
        "spm.model",
        "spm.vocab",
        *sorted(f"{s}.{x}" for s in splits for x in ("docs.json", "npy")),
    ]
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temp leftovers
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    def forbidden(*args, **kwargs):
        raise AssertionError("the vocabulary was retrained")

    monkeypatch.setattr(text_corpus, "_train_vocab", forbidden)
    assert text_corpus.prepare_corpus(corpus, PIECES, tmp_path / "a") == entry
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    monkeypatch.undo()

    again = text_corpus.prepare_corpus(corpus, PIECES, tmp_path / "b")
    for name in files:
        assert (entry / name).read_bytes() == (again / name).read_bytes(), name


def test_interrupted_training_leaves_no_cache(corpus, tmp_path, monkeypatch):
    def killed(entry):  # after spm.model is written into the temporary directory
        assert (entry / "spm.model").stat().st_size > 0
        raise KeyboardInterrupt

    monkeypatch.setattr(text_corpus, "load_vocab", killed)
    with pytest.raises(KeyboardInterrupt):
        text_corpus.prepare_corpus(corpus, PIECES, tmp_path)
    assert list((tmp_path / "text").iterdir()) == []


def test_cache_key_follows_the_corpus(tmp_path, corpus):
    copy = tmp_path / "copy"
    _make_corpus(copy)
    a = text_corpus.prepare_corpus(corpus, PIECES, tmp_path / "cache")
    assert text_corpus.prepare_corpus(copy, PIECES, tmp_path / "cache") == a  # same contents
    with open(copy / "part0/doc000.rst.txt", "a") as f:
        f.write("One more line.\n")
    assert text_corpus.prepare_corpus(copy, PIECES, tmp_path / "cache") != a


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv("SPARSE_UPCYCLE_CACHE", "/somewhere")
    assert text_corpus.default_cache_dir() == "/somewhere"
    monkeypatch.delenv("SPARSE_UPCYCLE_CACHE")
    assert text_corpus.default_cache_dir() == os.path.expanduser("~/.cache/sparse_upcycle")


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir()])
def test_missing_corpus(tmp_path, make):
    make(tmp_path / "nothing")
    data, model = _configs(tmp_path / "nothing", tmp_path / "cache")
    with pytest.raises(DataUnavailable, match="apt-get install python3.11-doc") as e:
        text.make_text_pipeline(data, "t5", model, "train")
    assert "\n" not in str(e.value)


def test_config_errors(corpus, cache):
    data, model = _configs(corpus, cache)
    model.vocab_size = PIECES + EXTRA - 1
    with pytest.raises(ValueError, match=rf"{PIECES + EXTRA - 1}.*{PIECES}"):
        text.make_text_pipeline(data, "t5", model, "train")
    data, model = _configs(corpus, cache, target_len=7)  # seq_len 32 needs 8
    with pytest.raises(ValueError, match="target_len >= 8"):
        text.make_text_pipeline(data, "t5", model, "train")
    with pytest.raises(ValueError, match="vit"):
        text.make_text_pipeline(data, "vit", model, "train")
    with pytest.raises(ValueError, match="split"):
        text.make_text_pipeline(data, "t5", model, "dev")


# ------------------------------------------------------------------------------------------------
# The real corpus (Debian python3.11-doc)
# ------------------------------------------------------------------------------------------------

needs_real = pytest.mark.skipif(
    not os.path.isdir(text_corpus.CORPUS_DIR), reason="python3.11-doc is not installed"
)


@needs_real
def test_real_corpus_splits():
    docs = text_corpus.list_documents(text_corpus.CORPUS_DIR)
    assert len(docs) > 400
    splits = {s: {d for d in docs if text_corpus.split_of(d) == s} for s in text_corpus.SPLITS}
    assert splits == {
        s: {d for d in docs if text_corpus.split_of(d) == s} for s in text_corpus.SPLITS
    }
    assert set().union(*splits.values()) == set(docs)
    assert sum(len(v) for v in splits.values()) == len(docs)  # disjoint
    assert all(len(v) > 5 for v in splits.values())
    for d in docs[:50]:  # the rule, computed independently
        bucket = int.from_bytes(hashlib.sha256(d.encode()).digest()[:4], "big") % 100
        want = "validation" if bucket < 5 else "test" if bucket < 10 else "train"
        assert text_corpus.split_of(d) == want


@needs_real
@pytest.mark.slow
def test_real_corpus_pipeline(tmp_path):
    """Trains the full 8000-piece vocabulary (~10 s on one core) and round-trips a batch."""
    data = ml_collections.ConfigDict(dict(seq_len=512, batch_size=2, cache_dir=str(tmp_path)))
    model = ml_collections.ConfigDict(dict(vocab_size=8192))  # 8000 + 100, padded like T5X
    for split in text_corpus.SPLITS:
        batch = next(text.make_text_pipeline(data, "t5", model, split))
        assert batch["encoder_input_tokens"].shape == (2, 512)
        assert batch["decoder_target_tokens"].shape == (2, 114)
        for row in range(2):
            inputs = batch["encoder_input_tokens"][row]
            assert inputs.max() == 8099  # <extra_id_0>
            targets = batch["decoder_target_tokens"][row]
            assert len(_reconstruct(inputs, targets, 8100, pieces=8000)) == 568
    entry = next((tmp_path / "text").iterdir())
    sp = spm.SentencePieceProcessor(model_file=str(entry / "spm.model"))
    assert sp.get_piece_size() == 8000 and sp.eos_id() == 1 and sp.pad_id() == 0
    assert "Python" in sp.decode(
        np.asarray(text_corpus.load_stream(entry, "validation")[:500]).tolist()
    )
