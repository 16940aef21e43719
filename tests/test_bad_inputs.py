"""Bad inputs, table-driven (issue 15: impossible settings, wrong JSON types, corrupt Orbax
checkpoints and recipe.json, configs that are not what the command needs, NaN in a source).

Each case builds one bad input, runs the CLI in-process and asserts: exit code 2, exactly one
stderr line matching the case's pattern (which names the field or file and what is expected),
every source file's sha256 unchanged, and nothing new left in the working directory (no output,
no temporary). Symlink aliasing, reads outside the source and full disks are covered by
tests/test_source_containment.py and tests/test_output_guards.py."""

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sparse_upcycle import cli
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.models import vit

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
UP = os.path.join(ROOT, "configs", "upcycle_tiny.py")
TRAIN = os.path.join(os.path.dirname(__file__), "configs", "train_tiny.py")
COMPARE = os.path.join(os.path.dirname(__file__), "configs", "compare_tiny.py")


def _vit_params(seed=0):
    model = vit.ViT(vit.config("tiny", head_zeroinit=False), rngs=nnx.Rngs(seed))
    return flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Good inputs shared by the cases (read-only for them): a dense ViT .npz, its upcycle
    output and a tiny HF Llama directory."""
    d = tmp_path_factory.mktemp("fx")
    np.savez(d / "vit.npz", **_vit_params())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "llama")
    src, moe = str(d / "vit.npz"), str(d / "vit_moe")
    assert cli.main(["upcycle", "--config", f"{UP}:vit", "--src", src, "--dst", moe]) == 0
    run = ["train", "--config", f"{TRAIN}:vit", "--workdir", str(d / "run")]
    assert cli.main([*run, "--config.total_steps=3"]) == 0  # checkpoint at step 3
    return d


def _tree_digest(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# ----------------------------------------------------------------------------- builders
# A builder gets (fx, w) and returns the path of the bad input it made in w (or of a good one).


def good_npz(fx, w):
    return str(fx / "vit.npz")


def good_moe(fx, w):
    return str(fx / "vit_moe")


def trained_run(fx, w):
    """A copy of a 3-step run of train_tiny.py:vit (4 experts) to resume."""
    shutil.copytree(fx / "run", w / "run")
    return str(w / "run")


def npz_with(change):
    def build(fx, w):
        params = dict(np.load(fx / "vit.npz"))
        change(params)
        np.savez(w / "dense.npz", **params)
        return str(w / "dense.npz")

    return build


def _widen(key):
    def change(params):
        params[key] = np.zeros((params[key].shape[0], params[key].shape[1] + 1), np.float32)

    return change


_MOE_DENSE_0 = "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"  # block 1: an MoE layer


def hf_with(**changes):
    def build(fx, w):
        d = w / "llama"
        shutil.copytree(fx / "llama", d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    return build


def hf_config_text(text):
    def build(fx, w):
        d = w / "llama"
        shutil.copytree(fx / "llama", d)
        (d / "config.json").write_text(text)
        return str(d)

    return build


def moe_with_recipe(mutate):
    def build(fx, w):
        d = w / "moe"
        shutil.copytree(fx / "vit_moe", d)
        info = json.loads((d / "recipe.json").read_text())
        mutate(info)
        (d / "recipe.json").write_text(json.dumps(info))  # inf is written as Infinity
        return str(d)

    return build


def moe_truncated(pattern):
    def build(fx, w):
        d = w / "moe"
        shutil.copytree(fx / "vit_moe", d)
        hits = [p for p in (d / "checkpoint").glob(pattern) if p.is_file()]
        assert hits, pattern
        for p in hits:
            p.write_bytes(p.read_bytes()[:7])
        return str(d)

    return build


def config_file(body):
    def build(fx, w):
        p = w / "bad_config.py"
        p.write_text(body)
        return str(p)

    return build


def _pop(key):
    return lambda info: info.pop(key)


def _set(key, value):
    return lambda info: info.__setitem__(key, value)


def _set_moe(key, value):
    return lambda info: info["model"]["moe"].__setitem__(key, value)


def _npz_declaring(w, shape):
    """A .npz whose member's .npy header declares ``shape`` but holds 16 bytes."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header = header.ljust(117) + "\n"
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(16)
    with zipfile.ZipFile(w / "big.npz", "w") as z:
        z.writestr("head/bias.npy", data)
    return str(w / "big.npz")


# ----------------------------------------------------------------------------- the table
UPCYCLE = ["upcycle", "--config", f"{UP}:vit", "--src", "{src}", "--dst", "{w}/out"]
DECODER = [
    "upcycle",
    "--config",
    f"{UP}:decoder",
    "--config.model.name=checkpoint",
    "--src",
    "{src}",
    "--dst",
    "{w}/out",
]
VERIFY = ["verify", "--config", f"{UP}:vit", "--dense", "{npz}", "--moe", "{src}"]
TRAIN_VIT = ["train", "--config", f"{TRAIN}:vit", "--workdir", "{w}/run"]
TRAIN_FROM = [*TRAIN_VIT, "--config.init_from={src}"]
EXPORT = ["export", "--format", "orbax", "--src", "{src}", "--dst", "{w}/out"]
EXPORT_CFG = [*EXPORT, "--config", f"{UP}:vit"]

CASES = [
    # --- impossible settings: upcycle
    ("up-noise-neg", good_npz, [*UPCYCLE, "--config.upcycle.noise_std=-0.1"], r"noise_std.*>= 0"),
    ("up-noise-nan", good_npz, [*UPCYCLE, "--config.upcycle.noise_std=nan"], r"noise_std.*finite"),
    (
        "up-router-std-neg",
        good_npz,
        [*UPCYCLE, "--config.upcycle.router_init_std=-1.0"],
        r"router_init_std.*>= 0",
    ),
    (
        "up-router-std-1e999",
        good_npz,
        [*UPCYCLE, "--config.upcycle.router_init_std=1e999"],
        r"config\.upcycle\.router_init_std must be a finite number, got inf",
    ),
    (
        "up-capacity-1e999",
        good_npz,
        [*UPCYCLE, "--config.model.moe.capacity_factor=1e999"],
        r"config\.model\.moe\.capacity_factor must be a finite number",
    ),
    (
        "up-eval-capacity-inf",
        good_npz,
        [*UPCYCLE, "--config.model.moe.eval_capacity_factor=inf"],
        r"config\.model\.moe\.eval_capacity_factor must be a finite number",
    ),
    (
        "up-jitter-nan",
        good_npz,
        [*UPCYCLE, "--config.model.moe.jitter_eps=-inf"],
        r"config\.model\.moe\.jitter_eps must be a finite number",
    ),
    (
        "up-drop-ratio-nan",
        good_npz,
        [*UPCYCLE, "--config.upcycle.method=drop", "--config.upcycle.drop_ratio=nan"],
        r"drop_ratio must be a finite number",
    ),
    (
        "up-overrides-inf",
        good_npz,
        [*UPCYCLE, "--config.model.overrides.dropout=1e999"],
        r"config\.model\.overrides\.dropout must be a finite number",
    ),
    (
        "up-file-nan",
        config_file(
            "import ml_collections\n"
            "def get_config(arg=None):\n"
            "    c = ml_collections.ConfigDict()\n"
            "    c.model = {'family': 'vit', 'name': 'tiny', 'moe': {'capacity_factor': "
            "float('nan')}}\n"
            "    c.upcycle = {'num_experts': 4}\n"
            "    return c\n"
        ),
        ["upcycle", "--config", "{src}", "--src", "{npz}", "--dst", "{w}/out"],
        r"config\.model\.moe\.capacity_factor must be a finite number, got nan",
    ),
    # --- config files that are not what the command needs
    (
        "up-get-config-list",
        config_file("def get_config(arg=None):\n    return [1, 2]\n"),
        ["upcycle", "--config", "{src}", "--src", "{npz}", "--dst", "{w}/out"],
        r"bad_config\.py: config must be a section \(dict\), got \[1, 2\] \(list\)",
    ),
    (
        "up-get-config-none",
        config_file("def get_config(arg=None):\n    return None\n"),
        ["upcycle", "--config", "{src}", "--src", "{npz}", "--dst", "{w}/out"],
        r"config must be a section \(dict\), got None",
    ),
    (
        "train-upcycle-only-config",
        good_npz,
        ["train", "--config", f"{UP}:vit", "--workdir", "{w}/run"],
        r"train needs config\.data, config\.optimizer, config\.total_steps",
    ),
    (
        "train-get-config-str",
        config_file("def get_config(arg=None):\n    return 'vit'\n"),
        ["train", "--config", "{src}", "--workdir", "{w}/run"],
        r"config must be a section \(dict\), got 'vit' \(str\)",
    ),
    (
        "compare-upcycle-only-config",
        good_npz,
        ["compare", "--config", f"{UP}:vit", "--workdir", "{w}/cmp"],
        r"unknown field config\.model; known fields of config: arms",
    ),
    (
        "compare-train-config",
        good_npz,
        ["compare", "--config", f"{TRAIN}:vit", "--workdir", "{w}/cmp"],
        r"unknown field config\.",
    ),
    # --- impossible settings: train / compare
    (
        "train-lr-neg",
        good_npz,
        [*TRAIN_VIT, "--config.optimizer.learning_rate=-0.1"],
        r"config\.optimizer\.learning_rate must be a finite number >= 0, got -0\.1",
    ),
    (
        "train-lr-nan",
        good_npz,
        [*TRAIN_VIT, "--config.optimizer.learning_rate=nan"],
        r"config\.optimizer\.learning_rate must be a finite number",
    ),
    (
        "train-steps-0",
        good_npz,
        [*TRAIN_VIT, "--config.total_steps=0"],
        r"config\.total_steps must be an int >= 1, got 0",
    ),
    (
        "train-steps-neg",
        good_npz,
        [*TRAIN_VIT, "--config.total_steps=-5"],
        r"config\.total_steps must be an int >= 1, got -5",
    ),
    (
        "train-weight-decay-1e999",
        good_npz,
        [*TRAIN_VIT, "--config.optimizer.weight_decay=1e999"],
        r"config\.optimizer\.weight_decay must be a finite number",
    ),
    (
        "train-b2-one",
        good_npz,
        [*TRAIN_VIT, "--config.optimizer.name=adamw", "--config.optimizer.b2=1.0"],
        r"config\.optimizer\.b2 must be in \[0, 1\)",
    ),
    (
        "train-batch-not-divisible",
        good_npz,
        [*TRAIN_VIT, "--config.data.batch_size=7"],
        r"config\.data\.batch_size=7 must be divisible by the 8 data-parallel devices",
    ),
    (
        "train-batch-expert-mesh",
        good_npz,
        [*TRAIN_VIT, "--config.data.batch_size=4", "--config.mesh.data=-1"],
        r"config\.data\.batch_size=4 must be divisible by the 8 data-parallel devices",
    ),
    (
        "train-peak-flops-inf",
        good_npz,
        [*TRAIN_VIT, "--config.peak_flops=inf"],
        r"config\.peak_flops must be a finite number",
    ),
    (
        "compare-lr-neg",
        good_npz,
        ["compare", "--config", COMPARE, "--workdir", "{w}/cmp"]
        + ["--config.train.optimizer.learning_rate=-1.0"],
        r"config\.train\.optimizer\.learning_rate must be a finite number >= 0",
    ),
    (
        "compare-extra-compute-inf",
        good_npz,
        ["compare", "--config", COMPARE, "--workdir", "{w}/cmp", "--config.extra_compute=inf"],
        r"config\.extra_compute must be a finite number",
    ),
    (
        "compare-batch-not-divisible",
        good_npz,
        ["compare", "--config", COMPARE, "--workdir", "{w}/cmp"]
        + ["--config.train.data.batch_size=6"],
        r"config\.train\.data\.batch_size=6 must be divisible by the 8 data-parallel devices",
    ),
    # --- a resume whose config builds another model than the checkpoint holds
    (
        "train-resume-num-experts",
        trained_run,
        [*TRAIN_VIT, "--config.upcycle.num_experts=2"],
        r"checkpoints/3 holds 4 experts per MoE layer, the config gives 2 \(upcycle\.num_experts\)",
    ),
    (
        "train-resume-dense-config",
        trained_run,
        ["train", "--config", f"{TRAIN}:vit-dense", "--workdir", "{w}/run"],
        r"checkpoints/3 holds 4 experts per MoE layer, the config gives 0",
    ),
    (
        "train-resume-mlp-width",
        trained_run,
        [*TRAIN_VIT, "--config.model.overrides.mlp_dim=48"],
        r"checkpoints/3 holds \(64,\) for Transformer/.*, the config's model has \(48,\)",
    ),
    # --- a dense checkpoint that is not the config's model: the tensor is named
    (
        "verify-dense-wrong-shape",
        npz_with(_widen(_MOE_DENSE_0)),
        ["verify", "--config", f"{UP}:vit", "--dense", "{src}", "--moe", "{fxmoe}"],
        r"dense\.npz: Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel has shape \(32, 65\), "
        r"the dense model of the config expects \(32, 64\)",
    ),
    (
        "verify-dense-missing-tensor",
        npz_with(lambda p: p.pop("Transformer/encoder_norm/scale")),
        ["verify", "--config", f"{UP}:vit", "--dense", "{src}", "--moe", "{fxmoe}"],
        r"the dense checkpoint lacks 'Transformer/encoder_norm/scale'",
    ),
    (
        "verify-dense-extra-tensor",
        npz_with(lambda p: p.__setitem__("Transformer/extra/kernel", np.ones((2, 2), np.float32))),
        ["verify", "--config", f"{UP}:vit", "--dense", "{src}", "--moe", "{fxmoe}"],
        r"the dense checkpoint has 'Transformer/extra/kernel', which the model lacks",
    ),
    (
        "up-dense-0-wrong-in-moe-layer",
        npz_with(_widen(_MOE_DENSE_0)),
        UPCYCLE,
        r"kernels disagree \(Dense_0 \(32, 65\), Dense_1 \(64, 32\)\)",
    ),
    # --- verify --tol
    ("verify-tol-nan", good_moe, [*VERIFY, "--tol", "nan"], r"--tol: expected a finite number"),
    ("verify-tol-neg", good_moe, [*VERIFY, "--tol=-1e-4"], r"--tol: expected a finite number"),
    ("verify-tol-inf", good_moe, [*VERIFY, "--tol", "inf"], r"--tol: expected a finite number"),
    ("verify-tol-abc", good_moe, [*VERIFY, "--tol", "abc"], r"--tol: expected a finite number"),
    # --- wrong JSON types in an HF config.json
    (
        "hf-hidden-size-str",
        hf_with(hidden_size="abc"),
        DECODER,
        r"config\.json: hidden_size must be a positive integer, got 'abc' \(str\)",
    ),
    (
        "hf-layers-float",
        hf_with(num_hidden_layers=2.5),
        DECODER,
        r"config\.json: num_hidden_layers must be a positive integer, got 2\.5",
    ),
    (
        "hf-heads-str-int",
        hf_with(num_attention_heads="4"),
        DECODER,
        r"config\.json: num_attention_heads must be a positive integer, got '4'",
    ),
    (
        "hf-kv-heads-bool",
        hf_with(num_key_value_heads=True),
        DECODER,
        r"config\.json: num_key_value_heads must be a positive integer, got True",
    ),
    (
        "hf-intermediate-null",
        hf_with(intermediate_size=None),
        DECODER,
        r"config\.json: intermediate_size must be set, got null",
    ),
    (
        "hf-rope-scaling-list",
        hf_with(rope_scaling=[1, 2]),
        DECODER,
        r"config\.json: rope_scaling must be a JSON object \(or null\), got \[1, 2\] \(list\)",
    ),
    (
        "hf-rope-scaling-str",
        hf_with(rope_scaling="linear"),
        DECODER,
        r"config\.json: rope_scaling must be a JSON object",
    ),
    (
        "hf-rope-parameters-list",
        hf_with(rope_parameters=[10000.0]),
        DECODER,
        r"config\.json: rope_parameters must be a JSON object",
    ),
    (
        "hf-rope-theta-str",
        hf_with(rope_theta="big"),
        DECODER,
        r"config\.json: rope_theta must be a finite number, got 'big'",
    ),
    (
        "hf-rms-eps-list",
        hf_with(rms_norm_eps=[1e-6]),
        DECODER,
        r"config\.json: rms_norm_eps must be a finite number",
    ),
    (
        "hf-tie-str",
        hf_with(tie_word_embeddings="yes"),
        DECODER,
        r"config\.json: tie_word_embeddings must be true or false",
    ),
    (
        "hf-hidden-act-int",
        hf_with(hidden_act=1),
        DECODER,
        r"config\.json: hidden_act must be a string",
    ),
    # --- recipe.json missing keys or of the wrong type (inspect, verify, train, export)
    (
        "inspect-recipe-no-family",
        moe_with_recipe(_pop("family")),
        ["inspect", "{src}"],
        r"recipe\.json: no 'family' key",
    ),
    (
        "inspect-recipe-no-model",
        moe_with_recipe(_pop("model")),
        ["inspect", "{src}"],
        r"recipe\.json: no 'model' key",
    ),
    (
        "verify-recipe-no-recipe",
        moe_with_recipe(_pop("recipe")),
        VERIFY,
        r"recipe\.json: no 'recipe' key",
    ),
    (
        "verify-recipe-model-list",
        moe_with_recipe(_set("model", [1])),
        VERIFY,
        r"recipe\.json: 'model' must be an object, got list",
    ),
    (
        "train-recipe-family-int",
        moe_with_recipe(_set("family", 3)),
        TRAIN_FROM,
        r"recipe\.json: 'family' must be a string, got int",
    ),
    (
        "export-recipe-source-str",
        moe_with_recipe(_set("source", "x")),
        ["export", "--src", "{src}", "--dst", "{w}/out"],
        r"recipe\.json: 'source' must be an object or null, got str",
    ),
    (
        "inspect-recipe-capacity-1e999",
        moe_with_recipe(_set_moe("capacity_factor", float("inf"))),
        ["inspect", "{src}"],
        r"recipe\.json: .*capacity_factor must be a finite number, got inf",
    ),
    (
        "verify-recipe-capacity-inf",
        moe_with_recipe(_set_moe("eval_capacity_factor", float("inf"))),
        VERIFY,
        r"recipe\.json: .*eval_capacity_factor must be a finite number",
    ),
    # --- corrupt Orbax checkpoints (data or metadata files)
    (
        "inspect-orbax-metadata",
        moe_truncated("state/_METADATA"),
        ["inspect", "{src}"],
        r"checkpoint: cannot read the Orbax metadata: a corrupt or truncated metadata file",
    ),
    (
        "verify-orbax-manifest",
        moe_truncated("state/manifest.ocdbt"),
        VERIFY,
        r"cannot read the Orbax metadata: a corrupt or truncated metadata file",
    ),
    (
        "train-orbax-metadata",
        moe_truncated("state/_METADATA"),
        TRAIN_FROM,
        r"cannot read the Orbax metadata: a corrupt or truncated metadata file",
    ),
    (
        "verify-orbax-data",
        moe_truncated("state/ocdbt.process_*/d/*"),
        VERIFY,
        r"checkpoint: cannot restore '.*': corrupt or truncated data",
    ),
    (
        "export-orbax-data",
        moe_truncated("state/ocdbt.process_*/d/*"),
        ["export", "--src", "{src}", "--dst", "{w}/out", "--format", "orbax"],
        r"checkpoint: cannot restore '.*': corrupt or truncated data",
    ),
    # --- found by a fault campaign of our own (issue 15's neighbours)
    (
        "npz-huge-declared-shape",
        lambda fx, w: _npz_declaring(w, (10**11,)),
        ["inspect", "{src}"],
        r"member 'head/bias' declares shape \(100000000000,\).*corrupt",
    ),
    (
        "npz-int-param",
        npz_with(lambda p: p.__setitem__("head/bias", p["head/bias"].astype(np.int32))),
        UPCYCLE,
        r"head/bias: the checkpoint holds int32 values; the model expects a floating-point",
    ),
    (
        "recipe-model-unknown-field",
        moe_with_recipe(lambda i: i["model"].__setitem__("d_model", 8)),
        ["inspect", "{src}"],
        r"recipe\.json: unreadable \(model: unknown field\(s\) 'd_model'\)",
    ),
    (
        "recipe-model-wrong-type",
        moe_with_recipe(lambda i: i["model"].__setitem__("depth", "2")),
        VERIFY,
        r"recipe\.json: unreadable \(model\.depth must be an integer, got '2'\)",
    ),
    (
        "recipe-num-experts-str",
        moe_with_recipe(lambda i: i["recipe"].__setitem__("num_experts", "4")),
        VERIFY,
        r"recipe\.json: recipe\.num_experts must be an integer, got '4'",
    ),
    (
        "config-returns-dict",
        config_file("def get_config(arg=None):\n    return {'upcycle': {}}\n"),
        ["upcycle", "--config", "{src}", "--src", "{npz}", "--dst", "{w}/out"],
        r"upcycle needs config\.model and this config has none \(it defines upcycle\)",
    ),
    (
        "up-num-experts-beyond-memory",
        good_npz,
        [*UPCYCLE, "--config.upcycle.num_experts=100000000"],
        r"alone needs at least .* GiB, more than this machine's memory",
    ),
    (
        "up-abbreviated-flag",
        good_npz,
        [*UPCYCLE, "--overwrit"],
        r"unrecognized arguments: --overwrit",
    ),
    # --- export --format orbax with a config of impossible settings
    (
        "export-config-capacity-inf",
        good_npz,
        [*EXPORT_CFG, "--config.model.moe.capacity_factor=1e999"],
        r"config\.model\.moe\.capacity_factor must be a finite number",
    ),
    (
        "export-config-noise-neg",
        good_npz,
        [*EXPORT_CFG, "--config.upcycle.noise_std=-1.0"],
        r"noise_std must be a finite number >= 0",
    ),
]


def _fill(argv, fx, w, src):
    subs = {
        "{src}": src,
        "{w}": str(w),
        "{npz}": str(fx / "vit.npz"),
        "{fxmoe}": str(fx / "vit_moe"),
    }
    out = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def test_table_is_large_and_spans_every_command():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {argv[0] for _, _, argv, _ in CASES}
    assert commands == {"upcycle", "verify", "inspect", "train", "compare", "export"}


@pytest.mark.parametrize(
    ("build", "argv", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_exit_2_nothing_written(fx, tmp_path, capsys, build, argv, pattern):
    w = tmp_path / "w"
    w.mkdir()
    src = build(fx, w)
    sources, inputs = _tree_digest(fx), _tree_digest(w)
    capsys.readouterr()  # drop what building printed (transformers, upcycle)
    try:
        code = cli.main(_fill(argv, fx, w, src))
    except SystemExit as e:  # a usage error (argparse), e.g. --tol nan
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("sparse-upcycle: error: "), err
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert _tree_digest(fx) == sources  # the shared sources: unchanged
    assert _tree_digest(w) == inputs  # the bad input unchanged, nothing written beside it
    left = sorted(set(os.listdir(w)) - {p.split(os.sep)[0] for p in inputs})
    assert left == [], left


def test_corrupt_orbax_exits_with_one_line_and_no_event_loop_noise(fx, tmp_path):
    """In a process of its own: TensorStore's late callbacks into Orbax's closed event loop
    used to print ``RuntimeError: Event loop is closed`` tracebacks after the error line."""
    w = tmp_path / "w"
    w.mkdir()
    src = moe_truncated("state/manifest.ocdbt")(fx, w)
    for _ in range(3):  # the noise came from a race: try a few times
        out = subprocess.run(
            [sys.executable, "-m", "sparse_upcycle", "inspect", src],
            capture_output=True,
            text=True,
        )
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert "Orbax metadata" in lines[0] and "Event loop" not in out.stderr


def test_unretrieved_read_failures_of_corrupt_data_are_not_logged():
    """The sibling reads of a failed restore (TensorStore DATA_LOSS) leave unretrieved task
    exceptions; asyncio would log each after the one error line. Other ones are kept."""
    import logging

    from sparse_upcycle.async_noise import _ReportedWriteFailures

    def record(exc):
        return logging.LogRecord(
            "asyncio",
            logging.ERROR,
            __file__,
            1,
            "Task exception was never retrieved",
            None,
            (type(exc), exc, None),
        )

    f = _ReportedWriteFailures()
    assert not f.filter(record(ValueError('DATA_LOSS: Error opening "zarr3" driver')))
    assert f.filter(record(ValueError("something else")))


def test_nan_in_source_warns_by_name_and_verify_json_is_valid(fx, tmp_path, capsys):
    params = _vit_params()
    bad = "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"
    params[bad] = params[bad].copy()
    params[bad][0, 0] = np.nan
    params["head/bias"] = np.full_like(params["head/bias"], np.inf)
    src = str(tmp_path / "nan.npz")
    np.savez(src, **params)
    before = _tree_digest(tmp_path)
    dst = str(tmp_path / "moe")
    with pytest.warns(UserWarning) as caught:
        assert cli.main(["upcycle", "--config", f"{UP}:vit", "--src", src, "--dst", dst]) == 0
    warned = [str(w.message) for w in caught if "NaN/inf" in str(w.message)]
    assert len(warned) == 1, [str(w.message) for w in caught]
    assert bad in warned[0] and "head/bias" in warned[0] and "2 source tensor(s)" in warned[0]
    assert {k: v for k, v in _tree_digest(tmp_path).items() if k in before} == before
    capsys.readouterr()

    code = cli.main(["verify", "--config", f"{UP}:vit", "--dense", src, "--moe", dst])
    out = capsys.readouterr().out
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in verify JSON"))
    assert code == 1  # meant to preserve the dense function, and it cannot be checked
    assert result["ok"] is False and result["max_abs_delta"] is None
    assert result["verdict"].startswith("not verified: ")
    assert bad in result["verdict"] and set(result["non_finite_tensors"]) == {bad, "head/bias"}
    if result["dropped_fraction"]:
        assert "non-finite" in result["dropped_because"]


def test_refuse_non_finite_stops_at_the_first_and_writes_nothing(tmp_path, capsys):
    params = _vit_params()
    bad = "Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel"
    params[bad] = params[bad].copy()
    params[bad][1, :3] = [np.nan, np.inf, -np.inf]
    src = str(tmp_path / "nan.npz")
    np.savez(src, **params)
    before = _tree_digest(tmp_path)
    argv = ["upcycle", "--config", f"{UP}:vit", "--src", src, "--dst", str(tmp_path / "moe")]
    capsys.readouterr()
    assert cli.main([*argv, "--refuse-non-finite"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"tensor {bad} holds 3 NaN/inf value(s)" in lines[0], lines
    assert _tree_digest(tmp_path) == before  # nothing written, no temporary left
    # a finite source is unaffected by the flag
    np.savez(src, **_vit_params())
    assert cli.main([*argv, "--refuse-non-finite"]) == 0


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("t5", {"d_model": "512"}, r"d_model must be a positive integer, got '512'"),
        ("t5", {"num_layers": 2.0}, r"num_layers must be a positive integer, got 2\.0"),
        ("t5", {"feed_forward_proj": ["gated-gelu"]}, r"feed_forward_proj must be a string"),
        ("t5", {"layer_norm_epsilon": "1e-6"}, r"layer_norm_epsilon must be a finite number"),
        ("vit", {"hidden_size": [32]}, r"hidden_size must be a positive integer, got \[32\]"),
        ("vit", {"id2label": ["a", "b"]}, r"id2label must be a JSON object"),
        ("vit", {"num_labels": "10"}, r"num_labels must be an integer, got '10'"),
        ("vit", {"qkv_bias": "false"}, r"qkv_bias must be true or false"),
    ],
)
def test_t5_and_vit_config_json_types_are_named(family, change, message):
    """The T5 and ViT maps check config.json types as the Llama one does (the message is
    what HFCheckpoint prefixes with the directory and the CLI prints)."""
    from sparse_upcycle.checkpoints import hf_t5, hf_vit

    maps = {"t5": hf_t5, "vit": hf_vit}[family]
    base = {"t5": {"model_type": "t5", "feed_forward_proj": "gated-gelu"}, "vit": {}}[family]
    maps.config_from_hf({**base})  # the defaults alone are fine
    with pytest.raises(ValueError, match=r"^config\.json: " + message):
        maps.config_from_hf({**base, **change})
