"""Token shards: tokenising a directory of text with a tokenizer.json, the manifest, packed
decoder windows and T5 span corruption over memory-mapped shards, per-process rows, resume,
bad inputs, and a few training steps of the tiny decoder on shards written here.

Expected tokens are computed from the test's own vocabulary table (word -> id), not by the
``tokenizers`` library the code under test uses."""

from __future__ import annotations

import gzip
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from sparse_upcycle.config import load_config
from sparse_upcycle.data import corpus as text_corpus
from sparse_upcycle.data import make_pipeline, text, text_to_shards, token_shards
from sparse_upcycle.data.pipeline import DataUnavailable

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECIALS = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
PAD, EOS, UNK, BOS = 0, 1, 2, 3
WORDS = (
    "the a model expert router token layer data train test value function module python "
    "object class method string list dict file import return error sparse dense upcycle "
    "mixture of experts is are was with from into over under small large fast slow new old "
    "and or but not every each some many few first last next good simple clear"
).split()
VOCAB = {**SPECIALS, **{w: len(SPECIALS) + i for i, w in enumerate(WORDS)}}
SHARD_TOKENS = 100  # small, so that windows cross shard boundaries


def _tokenizer() -> Tokenizer:
    """A word-level tokenizer with a Llama-like post-processor (``<s>`` before each text)."""
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return tok


def _document(rng: np.random.Generator, lines: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(lines))


def _expected_ids(doc: str) -> list[int]:
    """``<s>`` + the words' ids + ``</s>``: what the shards must hold for a document."""
    return [BOS, *(VOCAB.get(w, UNK) for w in doc.split()), EOS]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``src/{train,validation,test}/``: .txt documents, a .jsonl and a .jsonl.gz in train;
    returns (src, tokenizer.json, {split: [documents in stream order]})."""
    base = tmp_path_factory.mktemp("corpus")
    tok_path = base / "tokenizer.json"
    _tokenizer().save(str(tok_path))
    src = base / "src"
    rng = np.random.default_rng(0)
    docs: dict[str, list[str]] = {}
    for split, n in {"train": 30, "validation": 6, "test": 4}.items():
        files = {f"{split}/d{j:02d}.txt": _document(rng, 3) for j in range(n)}
        files[f"{split}/empty.txt"] = ""  # skipped
        for rel, doc in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(doc, encoding="utf-8")
        docs[split] = [files[k] for k in sorted(files) if files[k]]
    lines = [_document(rng, 1) for _ in range(5)]
    jsonl = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines))
    (src / "train" / "sub").mkdir()
    (src / "train" / "sub" / "more.jsonl").write_text(jsonl, encoding="utf-8")
    with gzip.open(src / "train" / "zz.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(jsonl)
    (src / "train" / "notes.md").write_text("not a document")
    # sorted paths: d00..d29, sub/more.jsonl, zz.jsonl.gz
    docs["train"] += lines + lines
    return src, tok_path, docs


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    src, tok_path, _ = corpus
    out = tmp_path_factory.mktemp("out") / "shards"
    manifest = text_to_shards.tokenize_directory(
        src, out, tok_path, shard_tokens=SHARD_TOKENS, progress=False
    )
    return out, manifest


def _stream(out: pathlib.Path, manifest: dict, split: str) -> np.ndarray:
    files = [out / s["file"] for s in manifest["splits"][split]["shards"]]
    return np.concatenate([np.load(f) for f in files]).astype(np.int64)


def _data(where, **fields) -> ml_collections.ConfigDict:
    base = {"name": "token_shards", "path": str(where), "batch_size": 8, "seq_len": 16, "seed": 5}
    return ml_collections.ConfigDict({**base, **fields})


def _model(vocab_size=128):
    return ml_collections.ConfigDict({"vocab_size": vocab_size})


# ----------------------------------------------------------------------------------------------
# Tokenising
# ----------------------------------------------------------------------------------------------


def test_shards_hold_every_document_in_order(corpus, shards):
    _, _, docs = corpus
    out, manifest = shards
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == EOS
    assert manifest["vocab_size"] == len(VOCAB) and manifest["sentinels"] is None
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert sorted(os.listdir(out.parent)) == ["shards"]  # no temporary left beside it
    for split in ("train", "validation", "test"):
        expected = [t for d in docs[split] for t in _expected_ids(d)]
        entry = manifest["splits"][split]
        assert entry["tokens"] == len(expected) and entry["documents"] == len(docs[split])
        sizes = [s["tokens"] for s in entry["shards"]]
        assert len(sizes) == math.ceil(len(expected) / SHARD_TOKENS)
        assert all(n == SHARD_TOKENS for n in sizes[:-1]) and 0 < sizes[-1] <= SHARD_TOKENS
        stream = _stream(out, manifest, split)
        assert np.load(out / entry["shards"][0]["file"]).dtype == np.uint16
        np.testing.assert_array_equal(stream, expected)
    # Round trip through the tokenizer copied beside the shards: each document decodes back.
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert manifest["tokenizer"]["sha256"] == token_shards.file_sha256(corpus[1])
    stream = _stream(out, manifest, "validation")
    ends = np.flatnonzero(stream == EOS)
    pieces = np.split(stream, ends[:-1] + 1)
    decoded = [tok.decode(p.tolist(), skip_special_tokens=True) for p in pieces]
    assert decoded == [" ".join(d.split()) for d in docs["validation"]]


def test_without_split_directories_files_split_by_path_hash(corpus, tmp_path):
    src, tok_path, _ = corpus
    flat = tmp_path / "flat"
    shutil.copytree(src / "train", flat)
    manifest = text_to_shards.tokenize_directory(flat, tmp_path / "o", tok_path, progress=False)
    rels = sorted(p.relative_to(flat).as_posix() for p in flat.rglob("*.txt") if p.read_text())
    expected = {s: sum(text_corpus.split_of(r) == s for r in rels) for s in text_corpus.SPLITS}
    docs = {s: e["documents"] for s, e in manifest["splits"].items()}
    for split, count in expected.items():
        jsonl = 5 * sum(text_corpus.split_of(r) == split for r in ("sub/more.jsonl", "zz.jsonl.gz"))
        assert docs.get(split, 0) == count + jsonl


def test_command_writes_shards_with_a_progress_bar(corpus, tmp_path):
    src, tok_path, _ = corpus
    out = tmp_path / "cmd"
    args = ["--src", str(src), "--tokenizer", str(tok_path), "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "sparse_upcycle", "tokenize", *args, "--shard-tokens", "64"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "tokenising" in run.stderr and "100%" in run.stderr  # tqdm's bar
    assert f"wrote {out}" in run.stdout
    assert token_shards.open_shards(out).manifest["splits"]["train"]["shards"][0]["tokens"] == 64


def test_command_refusals_are_one_line_and_write_nothing(corpus, tmp_path, shards, capsys):
    src, tok_path, _ = corpus
    out, _ = shards

    def refused(*args, expect):
        code = text_to_shards.main(["--no-progress", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and expect in err, err
        return err

    common = ["--tokenizer", str(tok_path)]
    refused("--src", str(src), *common, "--out", str(src), expect="overlap")
    refused("--src", str(src), *common, "--out", str(src / "train" / "x"), expect="overlap")
    link = tmp_path / "alias"
    link.symlink_to(src)
    refused("--src", str(src), *common, "--out", str(link / "x"), expect="overlap")
    refused("--src", str(src), *common, "--out", str(out), expect="pass --overwrite")
    (tmp_path / "plain").mkdir()
    refused(
        "--src",
        str(src),
        *common,
        "--out",
        str(tmp_path / "plain"),
        "--overwrite",
        expect="not a token shard directory",
    )
    refused("--src", str(tmp_path / "nope"), *common, "--out", str(tmp_path / "o"), expect="--src")
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text("{}")
    refused(
        "--src",
        str(src),
        "--tokenizer",
        str(bad_tok),
        "--out",
        str(tmp_path / "o"),
        expect="not a tokenizer.json",
    )
    refused(
        "--src",
        str(src),
        *common,
        "--eos-token",
        "<end>",
        "--out",
        str(tmp_path / "o"),
        expect="--eos-token",
    )
    # A bad JSON line half-way: the error names file and line, and nothing is left behind.
    broken = tmp_path / "broken"
    shutil.copytree(src / "validation", broken)
    (broken / "zz.jsonl").write_text('{"text": "a b"}\n{"text": 3}\n')
    refused("--src", str(broken), *common, "--out", str(tmp_path / "o"), expect="zz.jsonl:2")
    assert sorted(os.listdir(tmp_path)) == ["alias", "broken", "plain", "tok.json"]


def test_overwrite_replaces_a_shard_directory(corpus, tmp_path):
    src, tok_path, _ = corpus
    out = tmp_path / "o"
    text_to_shards.tokenize_directory(src / "validation", out, tok_path, progress=False)
    (out / "stale.npy").write_bytes(b"")
    manifest = text_to_shards.tokenize_directory(src, out, tok_path, overwrite=True, progress=False)
    assert "stale.npy" not in os.listdir(out) and "train" in manifest["splits"]
    assert sorted(os.listdir(tmp_path)) == ["o"]


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def test_decoder_windows_are_packed_across_shard_boundaries(shards):
    out, manifest = shards
    seq = 48
    stream = _stream(out, manifest, "validation")
    pipe = make_pipeline(_data(out, seq_len=seq, batch_size=2), "decoder", _model(), "validation")
    n_windows = (len(stream) - 1) // seq
    rows = []
    for _ in range(math.ceil(n_windows / 2)):
        batch = next(pipe)
        assert set(batch) == {"tokens", "targets", "weights"}
        assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (2, seq)
        rows += list(zip(batch["tokens"], batch["targets"], batch["weights"], strict=True))
    for i, (tokens, targets, weights) in enumerate(rows[:n_windows]):
        np.testing.assert_array_equal(tokens, stream[i * seq : i * seq + seq])
        np.testing.assert_array_equal(targets, stream[i * seq + 1 : i * seq + seq + 1])
        assert weights.dtype == np.float32 and np.all(weights == 1)
    # At least one window straddles a shard boundary (100, 200, ...).
    assert any(i * seq // SHARD_TOKENS != (i * seq + seq) // SHARD_TOKENS for i in range(n_windows))
    # Validation is not shuffled: a fresh pipeline gives the same first batch.
    again = make_pipeline(_data(out, seq_len=seq, batch_size=2), "decoder", _model(), "validation")
    np.testing.assert_array_equal(next(again)["tokens"], np.stack([r[0] for r in rows[:2]]))


def test_train_rows_are_windows_and_each_epoch_is_a_permutation(shards):
    out, manifest = shards
    stream = _stream(out, manifest, "train")
    seq, batch_size = 16, 8
    n = (len(stream) - 1) // seq
    pipe = make_pipeline(_data(out, batch_size=batch_size), "decoder", _model(), "train")
    rows = np.concatenate([next(pipe)["tokens"] for _ in range(n // batch_size)])
    windows = {stream[i * seq : i * seq + seq].tobytes(): i for i in range(n)}
    assert len(windows) == n  # no two windows alike, so a row names its window
    starts = [windows[row.astype(stream.dtype).tobytes()] for row in rows]
    assert len(set(starts)) == len(starts)  # no window twice within the first epoch
    assert starts != sorted(starts)  # shuffled


def test_two_processes_read_the_halves_of_each_global_batch(shards):
    out, _ = shards
    data = _data(out)
    one = make_pipeline(data, "decoder", _model(), "train")
    two = [
        make_pipeline(data, "decoder", _model(), "train", process_index=p, process_count=2)
        for p in range(2)
    ]
    for _ in range(5):
        full = next(one)
        halves = [next(p) for p in two]
        for key in full:
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])
    a, b = (next(p)["tokens"] for p in two)
    assert not any(np.array_equal(x, y) for x in a for y in b)  # disjoint rows


@pytest.mark.parametrize("family", ["decoder", "t5"])
def test_resume_from_the_state_gives_the_same_next_batches(shards, family):
    out, _ = shards
    data, model = _data(out, seq_len=24, extra_ids=10), _model()
    pipe = make_pipeline(data, family, model, "train")
    for _ in range(3):
        next(pipe)
    state = json.loads(json.dumps(pipe.get_state()))
    expected = [next(pipe) for _ in range(2)]
    resumed = make_pipeline(data, family, model, "train")
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_t5_span_corruption_rebuilds_the_raw_chunks(shards):
    out, manifest = shards
    seq, extra = 24, 10
    model = _model(len(VOCAB) + extra)
    data = _data(out, seq_len=seq, extra_ids=extra, batch_size=2)
    pipe = make_pipeline(data, "t5", model, "validation")
    length, targets_len = text.random_spans_helper(seq, 0.15, 3.0)
    stream = _stream(out, manifest, "validation")
    first_sentinel = len(VOCAB) + extra - 1
    batch = next(pipe)
    assert batch["encoder_input_tokens"].shape == (2, seq)
    assert batch["decoder_target_tokens"].shape == (2, targets_len)
    for i in range(2):
        inputs = batch["encoder_input_tokens"][i].tolist()
        targets = batch["decoder_target_tokens"][i].tolist()
        assert inputs[-1] == EOS and targets[targets.index(EOS) - 1] != PAD
        spans, current = {}, None
        for t in targets[: targets.index(EOS)]:
            if t > first_sentinel - extra:
                current = t
                spans[t] = []
            else:
                spans[current].append(t)
        rebuilt = [u for t in inputs[:-1] for u in (spans[t] if t in spans else [t])]
        assert rebuilt == stream[i * length : (i + 1) * length].tolist()
        assert sorted(spans, reverse=True) == [first_sentinel - k for k in range(len(spans))]


def test_t5_sentinels_from_the_tokenizer(shards, tmp_path):
    """A tokenizer with ``<extra_id_k>`` (T5's) is recorded and its ids are the sentinels."""
    out, _ = shards
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sentinels"] = {"first": len(VOCAB) - 1, "count": 5}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    batch = next(make_pipeline(_data(copy, seq_len=24), "t5", _model(), "validation"))
    sentinels = batch["encoder_input_tokens"][batch["encoder_input_tokens"] >= len(VOCAB) - 5]
    assert sentinels.size and sentinels.max() == len(VOCAB) - 1
    tok = _tokenizer()
    tok.add_special_tokens([f"<extra_id_{k}>" for k in (2, 1, 0)])  # ids count down from k=0
    assert text_to_shards._sentinels(tok) == {"first": len(VOCAB) + 2, "count": 3}


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def _edited(out: pathlib.Path, tmp_path: pathlib.Path, **changes) -> pathlib.Path:
    copy = tmp_path / "edited"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(changes)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_missing_directory_names_the_path_and_the_command(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataUnavailable) as e:
        make_pipeline(_data(missing), "decoder", _model(), "train")
    assert str(missing) in str(e.value)
    assert "sparse-upcycle tokenize --src TEXT_DIR" in str(e.value)
    assert f"--out {missing}" in str(e.value)
    with pytest.raises(ValueError, match="data.path is not set"):
        make_pipeline(_data(""), "decoder", _model(), "train")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"dtype": "int64"}, r"manifest\.json: dtype must be one of uint16, uint32, int32"),
        ({"eos_id": 500}, r"eos_id 500 is not below vocab_size"),
        ({"version": 2}, r"format/version must be"),
        (
            {"splits": {"train": {"tokens": 1, "shards": [{"file": "../x.npy", "tokens": 1}]}}},
            r"splits\.train\.shards\[0\]\.file '\.\./x\.npy' is not a plain file name",
        ),
    ],
)
def test_bad_manifest_names_the_field(shards, tmp_path, changes, match):
    path = _edited(shards[0], tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        make_pipeline(_data(path), "decoder", _model(), "train")


def test_manifest_dtype_unlike_the_shards_names_the_file(shards, tmp_path):
    path = _edited(shards[0], tmp_path, dtype="uint32")
    with pytest.raises(ValueError, match=r"train-00000\.npy: holds uint16 .* says dtype uint32"):
        make_pipeline(_data(path), "decoder", _model(), "train")


def test_window_longer_than_the_corpus_names_the_split_and_seq_len(shards):
    out, manifest = shards
    val = manifest["splits"]["validation"]["tokens"]
    with pytest.raises(ValueError, match=rf"validation split .* {val} tokens.*data\.seq_len {val}"):
        # the train split holds it; its check of the validation split does not
        make_pipeline(_data(out, seq_len=val), "decoder", _model(), "train")


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"seq_len": "16"}, r"data\.seq_len must be an int, got '16'"),
        ({"seq_len": True}, r"data\.seq_len must be an int"),
        ({"path": 3}, r"data\.path must be a directory"),
        ({"pathh": "x"}, r"unknown field data\.pathh; did you mean data\.path\?"),
        ({"tokenizer": "/nonexistent.json"}, r"data\.tokenizer /nonexistent\.json is not a file"),
    ],
)
def test_bad_data_fields_are_named(shards, fields, match):
    with pytest.raises(ValueError, match=match):
        make_pipeline(_data(shards[0], **fields), "decoder", _model(), "train")


def test_tokenizer_check_and_vocabulary_check(corpus, shards, tmp_path):
    out, _ = shards
    make_pipeline(_data(out, tokenizer=str(corpus[1])), "decoder", _model(), "train")
    other = tmp_path / "other.json"
    tok = _tokenizer()
    tok.add_special_tokens(["<new>"])
    tok.save(str(other))
    with pytest.raises(ValueError, match="is not the tokenizer the shards"):
        make_pipeline(_data(out, tokenizer=str(other)), "decoder", _model(), "train")
    with pytest.raises(ValueError, match=r"model vocab_size 50 is smaller than the shards'"):
        make_pipeline(_data(out), "decoder", _model(50), "train")
    with pytest.raises(ValueError, match=r"data\.extra_ids 100"):
        make_pipeline(_data(out), "t5", _model(), "train")


# ----------------------------------------------------------------------------------------------
# End to end: the tiny decoder of the Llama config trains on the shards
# ----------------------------------------------------------------------------------------------


def test_tiny_decoder_trains_on_token_shards(shards, tmp_path):
    from sparse_upcycle.train import train_and_evaluate

    out, _ = shards
    overrides = [
        "--config.data.name=token_shards",
        f"--config.data.path={out}",
        "--config.init_from=scratch",
        "--config.total_steps=3",
        "--config.optimizer.warmup_steps=1",
        "--config.eval_every=3",
        "--config.eval_steps=1",
        "--config.log_every=1",
        "--config.checkpoint.every=3",
        "--config.checkpoint.async=False",
        "--config.peak_flops=1e12",  # skip the matmul benchmark that only feeds MFU
    ]
    config = load_config(str(ROOT / "configs" / "llama_moe_8x_top2.py") + ":tiny_dense", overrides)
    result = train_and_evaluate(config, str(tmp_path / "w"))
    assert result["status"] == "done"
    assert math.isfinite(result["eval"]["loss"]) and result["eval"]["loss"] < math.log(128) + 1
    state = json.loads((tmp_path / "w" / "checkpoints" / "3" / "data" / "metadata").read_text())
    assert state == {"next_batch": 3}


@pytest.mark.parametrize(
    "name, family", [("llama_moe_8x_top2", "decoder"), ("t5_base_upcycle", "t5")]
)
def test_paper_configs_read_token_shards(shards, name, family):
    """The paper-scale data blocks name this pipeline and only fields it reads; without
    ``data.path`` they stop with one line saying so."""
    config = load_config(str(ROOT / "configs" / f"{name}.py"))
    assert config.data.name == "token_shards" and config.data.path == ""
    with pytest.raises(ValueError, match="data.path is not set"):
        make_pipeline(config.data, family, _model(), "train")
    small = ["--config.data.seq_len=16", "--config.data.batch_size=4"]
    if family == "t5":
        small.append("--config.data.target_len=8")
    config = load_config(
        str(ROOT / "configs" / f"{name}.py"), [f"--config.data.path={shards[0]}", *small]
    )
    batch = next(make_pipeline(config.data, family, _model(len(VOCAB) + 100), "train"))
    assert len(next(iter(batch.values()))) == 4


def test_train_command_names_a_missing_shard_directory(tmp_path, capsys):
    from sparse_upcycle import cli

    missing = tmp_path / "no_shards"
    code = cli.main(
        [
            "train",
            "--config",
            str(ROOT / "configs" / "llama_moe_8x_top2.py") + ":tiny_dense",
            "--config.init_from=scratch",
            "--config.data.name=token_shards",
            f"--config.data.path={missing}",
            "--workdir",
            str(tmp_path / "w"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"token shards not found at {missing}" in err[0]
    assert "sparse-upcycle tokenize" in err[0]
