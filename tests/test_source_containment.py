"""Nothing outside a source is read (issue 15, "reads outside the source"), and a corrupt .npz
member is one line.

Every file a checkpoint refers to (a safetensors index's shards, a T5X tensorstore spec's zarr
array, an HF directory's config/tokenizer/generation files, any symlink among them) must
resolve inside the source directory, or inside the same hub cache entry for a
``models--org--name/snapshots/<rev>/`` snapshot; otherwise exit 2 before it is opened, one
stderr line naming the entry and where it points, nothing written, the source unchanged.
"""

import hashlib
import io
import json
import os
import pathlib
import shutil
import zipfile

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx, serialization

from sparse_upcycle import cli
from sparse_upcycle.checkpoints import hf as hf_module
from sparse_upcycle.checkpoints import t5x as t5x_module
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.hf import HFCheckpoint
from sparse_upcycle.checkpoints.layout import read_hf_side
from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint
from sparse_upcycle.checkpoints.paths import contained, source_root
from sparse_upcycle.checkpoints.t5x import T5XCheckpoint, write_t5x
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.models import t5, vit

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "upcycle_tiny.py")
LLAMA = ["--config", f"{CONFIG}:decoder", "--config.model.name=checkpoint"]
SIDE_FILES = ("tokenizer.json", "generation_config.json", "special_tokens_map.json")
EMBED = "target.token_embedder.embedding"  # a T5X zarr array of the tiny T5


# --------------------------------------------------------------------------------------------
# Sources and checks.
# --------------------------------------------------------------------------------------------


def _digest(path):
    """sha256 over a source's files (symlinks followed) and its symlinks' targets."""
    h = hashlib.sha256()
    walk = sorted(os.walk(path)) if os.path.isdir(path) else [("", [], [path])]
    for root, _, files in walk:
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode() + (os.readlink(p).encode() if os.path.islink(p) else b""))
            if os.path.exists(p):
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def _params(model):
    return flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny sharded HF Llama (save_pretrained, 3+ shards) with side files, and its MoE."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    src = root / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="20KB")
    assert len([n for n in os.listdir(src) if n.endswith(".safetensors")]) >= 3
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (src / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    moe = root / "moe"
    code = cli.main(["upcycle", *LLAMA, "--src", str(src), "--dst", str(moe)])
    assert code == 0
    return src, moe


@pytest.fixture(scope="module")
def t5x_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5x")
    src = root / "checkpoint_7"
    write_t5x(str(src), _params(t5.T5(t5.config("tiny"), rngs=nnx.Rngs(0))), step=7)
    moe = root / "moe"
    code = cli.main(["upcycle", "--config", f"{CONFIG}:t5", "--src", str(src), "--dst", str(moe)])
    assert code == 0
    return src, moe


@pytest.fixture(scope="module")
def vit_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    src = root / "vit.npz"
    np.savez(src, **_params(vit.ViT(vit.config("tiny", head_zeroinit=False), rngs=nnx.Rngs(0))))
    moe = root / "moe"
    code = cli.main(["upcycle", "--config", f"{CONFIG}:vit", "--src", str(src), "--dst", str(moe)])
    assert code == 0
    return src, moe


def _refused(capsys, argv, src, dst, *patterns):
    """Run ``argv``; assert exit 2, one stderr line holding every pattern, the source
    unchanged, ``dst`` (when given) not written and no temporary sibling left."""
    before = _digest(src)
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("sparse-upcycle: error:"), err
    for p in patterns:
        assert p in lines[0], (p, err)
    assert _digest(src) == before
    if dst is not None:
        parent = os.path.dirname(dst)
        assert not os.path.exists(dst)
        assert not [n for n in os.listdir(parent) if n.startswith(".")], os.listdir(parent)
    return lines[0]


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _write_index(path, index):
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _record_opens(monkeypatch):
    """The files ``safe_open`` (HF) and ``ts.open`` (T5X) are asked to open."""
    opened = []
    real_safe_open, real_ts_open = hf_module.safe_open, t5x_module.ts.open

    def safe_open(path, *a, **k):
        opened.append(os.path.realpath(path))
        return real_safe_open(path, *a, **k)

    def ts_open(spec, *a, **k):  # Orbax calls it too, with other kinds of spec
        kvstore = spec.get("kvstore") if isinstance(spec, dict) else None
        if isinstance(kvstore, dict) and isinstance(kvstore.get("path"), str):
            opened.append(os.path.realpath(kvstore["path"]))
        return real_ts_open(spec, *a, **k)

    monkeypatch.setattr(hf_module, "safe_open", safe_open)
    monkeypatch.setattr(t5x_module.ts, "open", ts_open)
    return opened


# --------------------------------------------------------------------------------------------
# The helper.
# --------------------------------------------------------------------------------------------


def test_source_root_and_contained(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "a").write_text("x")
    root = source_root(str(d))
    assert root == os.path.realpath(d)
    assert contained(str(d / "a"), root, "a") == os.path.realpath(d / "a")
    assert contained(str(d / "sub" / ".." / "a"), root, "a")  # normalised, still inside
    with pytest.raises(CheckpointError, match=r"^entry points to /etc/passwd, outside"):
        contained("/etc/passwd", root, "entry")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        contained(str(d / ".." / "model-other" / "x"), root, "entry")  # a prefix is not inside
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    (snap / "sub").mkdir(parents=True)
    assert source_root(str(snap)) == os.path.realpath(tmp_path / "hub" / "models--org--tiny")
    assert source_root(str(snap / "sub")) == source_root(str(snap))
    assert source_root(str(tmp_path / "hub" / "models--org--tiny" / "snapshots")) == str(
        os.path.realpath(tmp_path / "hub" / "models--org--tiny" / "snapshots")
    )
    link = tmp_path / "link"
    link.symlink_to(d)
    assert source_root(str(link)) == os.path.realpath(d)


# --------------------------------------------------------------------------------------------
# Sharded safetensors: the index's weight_map and symlinked shards.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["dotdot", "absolute", "etc_passwd", "symlink", "index_link"])
def test_safetensors_references_outside_are_refused_before_opening(
    llama, tmp_path, capsys, monkeypatch, where
):
    plain, _ = llama
    src = _copy(plain, tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    index = _index(src)
    victim = sorted(set(index["weight_map"].values()))[0]
    outside = elsewhere / "x.safetensors"
    shutil.copy(src / victim, outside)  # a valid shard: without the rule it would be read
    target = str(outside)
    if where == "dotdot":
        ref = "../elsewhere/x.safetensors"
    elif where == "absolute":
        ref = str(outside)
    elif where == "etc_passwd":
        ref = target = "/etc/passwd"
    if where in ("dotdot", "absolute", "etc_passwd"):
        index["weight_map"] = {
            k: (ref if v == victim else v) for k, v in index["weight_map"].items()
        }
        _write_index(src, index)
        entry = "weight_map["
    elif where == "symlink":
        (src / victim).unlink()
        (src / victim).symlink_to(outside)
        entry = victim
    else:  # the index itself links outside
        shutil.move(src / "model.safetensors.index.json", elsewhere / "index.json")
        (src / "model.safetensors.index.json").symlink_to(elsewhere / "index.json")
        target, entry = str(elsewhere / "index.json"), "model.safetensors.index.json"
    opened = _record_opens(monkeypatch)
    dst = str(tmp_path / "out")
    line = _refused(
        capsys,
        ["upcycle", *LLAMA, "--src", str(src), "--dst", dst],
        src,
        dst,
        entry,
        f"points to {os.path.realpath(target)}",
        "outside the checkpoint directory",
    )
    assert os.path.realpath(target) not in opened, line
    for argv in (["inspect", str(src)], ["verify", *LLAMA]):
        if argv[0] == "verify":
            argv = [*argv, "--dense", str(src), "--moe", str(llama[1])]
        _refused(capsys, argv, src, None, entry, "outside the checkpoint directory")
    assert os.path.realpath(target) not in opened


def test_single_safetensors_and_config_linking_outside(llama, tmp_path, capsys):
    plain, _ = llama
    transformers_dir = tmp_path / "single"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(plain)
    model.save_pretrained(transformers_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("model.safetensors", "config.json"):
        src = _copy(transformers_dir, tmp_path / f"src-{name}")
        shutil.move(src / name, elsewhere / name)
        (src / name).symlink_to(elsewhere / name)
        _refused(
            capsys,
            ["inspect", str(src)],
            src,
            None,
            f"{src / name} points to {os.path.realpath(elsewhere / name)}",
        )


def test_bad_weight_map_types_are_one_line(llama, tmp_path, capsys):
    plain, _ = llama
    for i, weight_map in enumerate([["a"], {"model.norm.weight": 3}, "x"]):
        src = _copy(plain, tmp_path / f"src{i}")
        index = _index(src)
        index["weight_map"] = weight_map
        _write_index(src, index)
        _refused(capsys, ["inspect", str(src)], src, None, "weight_map must be an object")
    src = _copy(plain, tmp_path / "list")
    (src / "model.safetensors.index.json").write_text("[1, 2]")
    _refused(capsys, ["inspect", str(src)], src, None, "not a safetensors index")


# --------------------------------------------------------------------------------------------
# HF side files.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SIDE_FILES)
def test_side_file_symlinked_outside_is_not_copied(llama, tmp_path, capsys, name):
    plain, _ = llama
    src = _copy(plain, tmp_path / "src")
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": "do not copy"}')
    (src / name).unlink(missing_ok=True)
    (src / name).symlink_to(secret)
    dst = str(tmp_path / "out")
    argv = ["upcycle", *LLAMA, "--src", str(src), "--dst", dst]
    _refused(capsys, argv, src, dst, f"{src / name} points to {secret}")
    # export of the HF directory itself, in either format
    for fmt in ("hf", "orbax"):
        argv = ["export", "--src", str(src), "--dst", dst, "--format", fmt]
        _refused(capsys, argv, src, dst, f"{name} points to {secret}")
    with pytest.raises(CheckpointError, match=f"{name} points to {secret}"):
        HFCheckpoint(str(src))  # what train's init_from opens


def test_planted_symlink_in_hf_source_is_not_exported(llama, tmp_path, capsys):
    """An upcycle output whose hf_source/ holds a link outside (not one we wrote) is refused
    by export (which copies hf_source/ files into its output) and by read_hf_side."""
    _, moe_dir = llama
    moe = _copy(moe_dir, tmp_path / "moe")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (moe / "hf_source" / "tokenizer.model").symlink_to(secret)
    dst = str(tmp_path / "out")
    for fmt in ("hf", "orbax"):
        argv = ["export", "--src", str(moe), "--dst", dst, "--format", fmt]
        _refused(capsys, argv, moe, dst, "tokenizer.model points to", str(secret))
    with pytest.raises(CheckpointError, match="tokenizer.model points to"):
        read_hf_side(str(moe / "hf_source"))
    (moe / "hf_source" / "tokenizer.model").unlink()
    (moe / "hf_source" / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"hf_source/sub points to"):
        read_hf_side(str(moe / "hf_source"))  # copytree would follow a linked directory


# --------------------------------------------------------------------------------------------
# HF hub cache snapshots: symlinks into the same entry's blobs keep working everywhere.
# --------------------------------------------------------------------------------------------


def _hub_snapshot(plain, hub, repo="models--org--tiny", rev="0123abcd"):
    """``plain`` laid out as huggingface_hub caches it: blobs/<sha256> and snapshots/<rev>/
    holding relative symlinks ``../../blobs/<sha256>``."""
    entry = hub / repo
    (entry / "blobs").mkdir(parents=True)
    snap = entry / "snapshots" / rev
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(rev)
    for name in sorted(os.listdir(plain)):
        data = (plain / name).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (entry / "blobs" / sha).write_bytes(data)
        (snap / name).symlink_to(os.path.join("..", "..", "blobs", sha))
    return snap


def test_hub_cache_snapshot_keeps_working(llama, tmp_path, capsys):
    plain, moe_plain = llama
    snap = _hub_snapshot(plain, tmp_path / "hub")
    assert all(os.path.islink(snap / n) for n in os.listdir(snap))
    before = _digest(snap)
    dst = tmp_path / "moe"
    argv = ["upcycle", *LLAMA, "--src", str(snap), "--dst", str(dst)]
    assert cli.main(argv) == 0
    verify = ["verify", *LLAMA, "--dense", str(snap), "--moe", str(dst)]
    capsys.readouterr()
    assert cli.main(verify) == 0 and json.loads(capsys.readouterr().out)["ok"]
    assert cli.main(["inspect", str(snap)]) == 0
    # the same tensors as from the plain directory, and the side files copied by value
    ours, theirs = (
        OrbaxCheckpoint(str(dst / "checkpoint")),
        OrbaxCheckpoint(str(moe_plain / "checkpoint")),
    )
    assert ours.keys() == theirs.keys()
    for k in ours.keys():
        np.testing.assert_array_equal(ours.read(k), theirs.read(k), err_msg=k)
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        copied = dst / "hf_source" / name
        assert not copied.is_symlink() and copied.read_bytes() == (plain / name).read_bytes()
    exported = tmp_path / "exported"
    assert cli.main(["export", "--src", str(snap), "--dst", str(exported)]) == 0
    assert (exported / "tokenizer.json").read_bytes() == (plain / "tokenizer.json").read_bytes()
    again = tmp_path / "exported2"  # its hf_source/ copied on (Mixtral would need all layers MoE)
    assert cli.main(["export", "--src", str(dst), "--dst", str(again), "--format", "orbax"]) == 0
    assert (again / "hf_source" / "tokenizer.json").read_bytes() == (
        plain / "tokenizer.json"
    ).read_bytes()
    assert _digest(snap) == before


def test_hub_cache_snapshot_linking_into_another_entry_is_refused(llama, tmp_path, capsys):
    plain, _ = llama
    snap = _hub_snapshot(plain, tmp_path / "hub")
    other = _hub_snapshot(plain, tmp_path / "hub", repo="models--evil--other")
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(
        os.path.join(
            "..",
            "..",
            "..",
            "models--evil--other",
            "blobs",
            os.readlink(other / "tokenizer.json").rsplit("/", 1)[1],
        )
    )
    _refused(
        capsys,
        ["inspect", str(snap)],
        snap,
        None,
        "tokenizer.json points to",
        "models--evil--other/blobs/",
        f"outside the checkpoint directory {os.path.realpath(snap.parent.parent)}",
    )


# --------------------------------------------------------------------------------------------
# T5X tensorstore specs.
# --------------------------------------------------------------------------------------------


def _edit_spec(step_dir, key_path, edit):
    """Rewrite the tensorstore spec of ``key_path`` (a tuple into optimizer/target)."""
    file = step_dir / "checkpoint"
    state = serialization.msgpack_restore(file.read_bytes())
    node = state["optimizer"]["target"]
    for k in key_path[:-1]:
        node = node[k]
    node[key_path[-1]] = edit(dict(node[key_path[-1]]))
    file.write_bytes(serialization.msgpack_serialize(state))


@pytest.mark.parametrize(
    "case",
    [
        "absolute",
        "dotdot",
        "driver_path",
        "dir_symlink",
        "chunk_symlink",
        "msgpack_link",
        "url",
        "driver",
    ],
)
def test_t5x_specs_outside_the_checkpoint_are_refused(
    t5x_source, tmp_path, capsys, monkeypatch, case
):
    plain, moe = t5x_source
    src = _copy(plain, tmp_path / "checkpoint_7")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / EMBED
    shutil.move(src / EMBED, outside)  # a valid array: without the rule it would be read
    key = ("token_embedder", "embedding")
    expected = ["tensor 'token_embedder/embedding'", f"points to {outside}"]
    if case == "absolute":
        _edit_spec(src, key, lambda s: {**s, "kvstore": {"driver": "file", "path": str(outside)}})
    elif case == "dotdot":
        rel = f"../elsewhere/{EMBED}"
        _edit_spec(src, key, lambda s: {**s, "kvstore": {"driver": "file", "path": rel}})
        expected.append(repr(rel))
    elif case == "driver_path":  # tensorstore appends the driver-level path to the kvstore's
        _edit_spec(
            src,
            key,
            lambda s: {
                **s,
                "kvstore": {"driver": "file", "path": ".."},
                "path": f"elsewhere/{EMBED}",
            },
        )
    elif case == "dir_symlink":
        (src / EMBED).symlink_to(outside, target_is_directory=True)
        expected = [f"points to {outside}"]
    elif case == "chunk_symlink":
        shutil.copytree(outside, src / EMBED)
        chunk = next(p for p in (src / EMBED).iterdir() if not p.name.startswith("."))
        chunk.unlink()
        chunk.symlink_to(outside / chunk.name)
        expected = [f"{chunk} points to {outside / chunk.name}"]
    elif case == "msgpack_link":  # the checkpoint file itself
        shutil.move(src / "checkpoint", elsewhere / "checkpoint")
        (src / "checkpoint").symlink_to(elsewhere / "checkpoint")
        expected = [f"{src / 'checkpoint'} points to {elsewhere / 'checkpoint'}"]
    elif case == "url":
        _edit_spec(src, key, lambda s: {**s, "kvstore": f"file://{outside}/"})
        expected = ["tensorstore kvstore must be an object"]
    else:
        _edit_spec(src, key, lambda s: {**s, "driver": "json"})
        expected = ["tensorstore driver 'json' is not supported"]
    opened = _record_opens(monkeypatch)
    dst = str(tmp_path / "out")
    argv = ["upcycle", "--config", f"{CONFIG}:t5", "--src", str(src), "--dst", dst]
    _refused(capsys, argv, src, dst, *expected)
    _refused(capsys, ["inspect", str(src)], src, None, *expected)
    verify = ["verify", "--config", f"{CONFIG}:t5", "--dense", str(src), "--moe", str(moe)]
    _refused(capsys, verify, src, None, *expected)
    assert not [p for p in opened if p.startswith(str(elsewhere))]


def test_t5x_paths_inside_the_checkpoint_keep_working(t5x_source, tmp_path):
    plain, _ = t5x_source
    want = T5XCheckpoint(str(plain))
    # an absolute path to its own array, a ./ path, and the whole step dir behind a symlink
    src = _copy(plain, tmp_path / "checkpoint_7")
    key = ("token_embedder", "embedding")
    _edit_spec(src, key, lambda s: {**s, "kvstore": {"driver": "file", "path": str(src / EMBED)}})
    _edit_spec(
        src,
        ("decoder", "logits_dense", "kernel"),
        lambda s: {**s, "kvstore": {"driver": "file", "path": "./" + s["kvstore"]["path"]}},
    )
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    for path in (src, link):
        got = T5XCheckpoint(str(path))
        assert got.keys() == want.keys()
        for k in want.keys():
            np.testing.assert_array_equal(got.read(k), want.read(k), err_msg=k)
    # a hub cache snapshot of a T5X checkpoint: every zarr file a link into ../../blobs
    entry = tmp_path / "hub" / "models--google--t5-tiny"
    step = entry / "snapshots" / "rev" / "checkpoint_7"
    for here, _, files in os.walk(plain):
        rel = os.path.relpath(here, plain)
        (step / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            data = open(os.path.join(here, f), "rb").read()
            blob = entry / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            (step / rel / f).symlink_to(os.path.relpath(blob, step / rel))
    got = T5XCheckpoint(str(step))
    for k in want.keys():
        np.testing.assert_array_equal(got.read(k), want.read(k), err_msg=k)


# --------------------------------------------------------------------------------------------
# Corrupt .npz members.
# --------------------------------------------------------------------------------------------


def _member_offset(path, member):
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = np.frombuffer(f.read(4), np.uint16)
    return info.header_offset + 30 + int(n) + int(m), info.compress_size


@pytest.mark.parametrize("how", ["crc", "deflate", "short_member"])
def test_corrupt_npz_member_is_one_line(vit_source, tmp_path, capsys, how):
    plain, moe = vit_source
    src = tmp_path / "vit.npz"
    arrays = dict(np.load(plain))
    member = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
    if how == "crc":  # a stored member whose bytes no longer match its CRC-32
        shutil.copy(plain, src)
        offset, size = _member_offset(src, member + ".npy")
        data = bytearray(src.read_bytes())
        data[offset + size - 8] ^= 0xFF
        src.write_bytes(bytes(data))
        expected = ["corrupt or truncated", "Bad CRC-32"]
    elif how == "deflate":  # a compressed member whose stream is broken
        np.savez_compressed(src, **arrays)
        offset, size = _member_offset(src, member + ".npy")
        data = bytearray(src.read_bytes())
        for i in range(size // 3, size // 3 + 16):
            data[offset + i] ^= 0xFF
        src.write_bytes(bytes(data))
        expected = ["corrupt or truncated"]
    else:  # a member holding fewer bytes than its .npy header says (a truncated write)
        with zipfile.ZipFile(src, "w") as z:
            for name, value in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, value)
                blob = buf.getvalue()
                z.writestr(name + ".npy", blob[: len(blob) // 2] if name == member else blob)
        expected = []
    expected = [str(src), f"member {member!r}", *expected]
    dst = str(tmp_path / "out")
    argv = ["upcycle", "--config", f"{CONFIG}:vit", "--src", str(src), "--dst", dst]
    _refused(capsys, argv, src, dst, *expected)
    _refused(capsys, ["inspect", str(src)], src, None, *expected)
    verify = ["verify", "--config", f"{CONFIG}:vit", "--dense", str(src), "--moe", str(moe)]
    _refused(capsys, verify, src, None, *expected)


# --------------------------------------------------------------------------------------------
# Orbax sources, recipe.json checksums, train's init_from hf_source.
# --------------------------------------------------------------------------------------------


def _orbax_files(moe):
    return sorted(
        os.path.join(here, f)
        for here, _, files in os.walk(moe / "checkpoint")
        for f in files
        if not os.path.islink(os.path.join(here, f))
    )


@pytest.mark.parametrize("how", ["planted", "data file replaced"])
def test_orbax_source_linking_outside_is_refused(t5x_source, tmp_path, capsys, how):
    """An Orbax checkpoint (an upcycle output) holding a link outside itself, planted beside
    its files or in place of one TensorStore reads, is refused by every command that opens
    it, before anything is read."""
    _, moe_dir = t5x_source
    moe = _copy(moe_dir, tmp_path / "moe")
    secret = tmp_path / "secret.bin"
    if how == "planted":
        secret.write_bytes(b"secret")
        link = moe / "checkpoint" / "state" / "extra"
    else:
        data = [f for f in _orbax_files(moe) if f"{os.sep}d{os.sep}" in f]
        link = pathlib.Path(data[0])
        shutil.copy(link, secret)  # the same bytes, outside the checkpoint
        link.unlink()
    link.symlink_to(secret)
    dst = str(tmp_path / "out")
    _refused(capsys, ["inspect", str(moe)], moe, None, f"{link} points to {secret}")
    export = ["export", "--src", str(moe), "--dst", dst, "--format", "orbax"]
    _refused(capsys, export, moe, dst, f"{link} points to {secret}")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        OrbaxCheckpoint(str(moe / "checkpoint"))
    # the same checkpoint without the link, behind a symlink of its own, keeps working
    link.unlink()
    if how != "planted":
        shutil.copy(secret, link)
    (tmp_path / "moe_link").symlink_to(moe, target_is_directory=True)
    assert cli.main(["inspect", str(tmp_path / "moe_link")]) == 0


def test_checksums_do_not_open_links_outside_the_source(t5x_source, tmp_path, monkeypatch):
    """recipe.json's sha256 table covers every file of the source; a link among them that
    leaves the source is recorded by its target, never opened."""
    import builtins

    from sparse_upcycle.checkpoints.layout import checksums

    plain, _ = t5x_source
    src = _copy(plain, tmp_path / "checkpoint_7")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (src / "notes.txt").symlink_to(secret)
    (src / "gone.txt").symlink_to(tmp_path / "nothing")
    opened = []
    real_open = builtins.open

    def spy(file, *a, **k):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    sums = checksums(str(src))
    dst = tmp_path / "moe"
    assert (
        cli.main(["upcycle", "--config", f"{CONFIG}:t5", "--src", str(src), "--dst", str(dst)]) == 0
    )
    monkeypatch.undo()
    assert str(secret) not in opened
    assert sums["notes.txt"] == f"link: {secret}"
    assert sums["gone.txt"] == f"link: {tmp_path / 'nothing'} (missing)"
    recorded = json.loads((dst / "recipe.json").read_text())["source"]["sha256"]
    assert recorded["notes.txt"] == f"link: {secret}"
    assert recorded.keys() == sums.keys()
    assert all(len(v) == 64 for k, v in recorded.items() if k not in ("notes.txt", "gone.txt"))


def test_train_init_from_with_hf_source_linking_outside_leaves_nothing(llama, tmp_path, capsys):
    """train copies an upcycle output's hf_source/ into the workdir (for export): a link
    outside init_from among its files is refused, and no --workdir is left behind."""
    _, moe_dir = llama
    moe = _copy(moe_dir, tmp_path / "moe")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (moe / "hf_source" / "tokenizer.model").symlink_to(secret)
    train_cfg = os.path.join(os.path.dirname(__file__), "configs", "train_tiny.py")
    workdir = tmp_path / "run"
    argv = ["train", "--config", f"{train_cfg}:decoder-dense", "--workdir", str(workdir)]
    argv += [f"--config.init_from={moe}", "--config.total_steps=1"]
    _refused(capsys, argv, moe, None, "tokenizer.model points to", str(secret))
    assert not workdir.exists()
