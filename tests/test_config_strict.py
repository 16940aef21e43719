"""Configs refuse what they do not know: a field no schema has, in an override or in the file,
and a value of another type than the default's, stop loading with one line that names the
field and the closest known names. Open sections (model overrides, MoE blocks, data, compare
arms' overrides) are checked by the builders that read them, with the same message."""

from __future__ import annotations

import glob
import os
import textwrap

import pytest

from sparse_upcycle import compare as compare_lib
from sparse_upcycle import task
from sparse_upcycle.cli import main
from sparse_upcycle.config import ConfigError, load_config
from sparse_upcycle.data import make_pipeline
from sparse_upcycle.task import resolve_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tests", "configs", "train_tiny.py")
COMPARE = os.path.join(ROOT, "tests", "configs", "compare_tiny.py")
UPCYCLE = os.path.join(ROOT, "configs", "upcycle_tiny.py")


def refused(spec: str, overrides=(), schema: str = "run") -> str:
    with pytest.raises(ConfigError) as e:
        load_config(spec, list(overrides), schema)
    message = str(e.value)
    assert "\n" not in message
    return message


def write(tmp_path, body: str, start: str = "default_config()") -> str:
    """A config file whose get_config runs ``body`` on ``c = start``."""
    path = tmp_path / "cfg.py"
    path.write_text(
        "import ml_collections\n\nfrom sparse_upcycle.train import default_config\n\n\n"
        f"def get_config(arg=None):\n    c = {start}\n"
        + textwrap.indent(textwrap.dedent(body), "    ")
        + "    return c\n"
    )
    return str(path)


# --------------------------------------------------------------------------- unknown fields


def test_unknown_top_level_override_names_the_close_field():
    message = refused(f"{TRAIN}:vit", ["--config.steps=3"])
    assert message.startswith("unknown field config.steps; did you mean ")
    assert "config.total_steps" in message


def test_unknown_nested_override_names_the_close_field():
    message = refused(f"{TRAIN}:vit", ["--config.optimizer.learnig_rate=1"])
    assert message.startswith("unknown field config.optimizer.learnig_rate; did you mean ")
    assert "config.optimizer.learning_rate" in message


def test_no_close_name_lists_the_section():
    message = refused(f"{TRAIN}:vit", ["--config.checkpoint.zzzz=1"])
    assert message == (
        "unknown field config.checkpoint.zzzz; "
        "known fields of config.checkpoint: async, every, keep"
    )


def test_unknown_field_in_the_file(tmp_path):
    path = write(tmp_path, "c.checkpoint.evry = 5\n")
    message = refused(path)
    assert message == (
        f"{path}: unknown field config.checkpoint.evry; did you mean config.checkpoint.every?"
    )
    path = write(tmp_path, "c.steps = 5\n")
    assert "config.total_steps" in refused(path)


def test_unknown_upcycle_field_at_load_and_in_the_recipe_builder():
    message = refused(f"{TRAIN}:vit", ["--config.upcycle.num_expert=3"])
    assert message == (
        "unknown field config.upcycle.num_expert; did you mean config.upcycle.num_experts or "
        "config.upcycle.non_expert?"
    )
    with pytest.raises(ConfigError, match=r"unknown field upcycle\.num_expert; did you mean "):
        task.recipe_from({"upcycle": {"method": "copy", "num_expert": 4}})


def test_model_block_is_closed():
    message = refused(f"{TRAIN}:vit", ["--config.model.famly=vit"])
    assert message == "unknown field config.model.famly; did you mean config.model.family?"


def test_unknown_model_override_is_refused_by_the_model_builder():
    c = load_config(f"{TRAIN}:vit", ["--config.model.overrides.pool_typ=gap"])
    with pytest.raises(ConfigError) as e:
        resolve_model(c, None)
    assert str(e.value) == (
        "unknown field model.overrides.pool_typ; did you mean model.overrides.pool_type?"
    )


def test_unknown_moe_field_is_refused_by_the_model_builder():
    c = load_config(f"{TRAIN}:t5", ["--config.model.encoder_moe.capacity_factr=2.0"])
    with pytest.raises(ConfigError) as e:
        resolve_model(c, None)
    message = str(e.value)
    assert message.startswith("unknown field model.encoder_moe.capacity_factr; did you mean ")
    assert "model.encoder_moe.capacity_factor" in message


def test_a_moe_block_the_family_does_not_have_is_refused():
    c = load_config(f"{TRAIN}:vit", ["--config.model.encoder_moe.k=1"])
    with pytest.raises(ConfigError, match=r"^unknown field model\.encoder_moe; known fields of "):
        resolve_model(c, None)


def test_unknown_data_field_is_refused_by_the_pipeline():
    c = load_config(f"{TRAIN}:vit", ["--config.data.nosie=2.0"])
    spec = resolve_model(c, None)
    with pytest.raises(ValueError) as e:
        make_pipeline(c.data, spec.family, spec.config, "train")
    assert str(e.value) == "unknown field data.nosie; did you mean data.noise?"
    # A field of another pipeline (left when a config switches data.name; no override can
    # remove it): ignored with a warning naming who reads it. synthetic has no `path`.
    data = load_config(f"{TRAIN}:vit").data
    data.path = "/corpus/shards"
    with pytest.warns(UserWarning, match=r"^data\.path is read by token_shards, not by data\.name"):
        assert next(iter(make_pipeline(data, spec.family, spec.config, "train")))


def test_unknown_arm_key_and_arm_override():
    message = refused(COMPARE, ["--config.arms.dense.kindd=dense"], "compare")
    assert message == "unknown field config.arms.dense.kindd; did you mean config.arms.dense.kind?"
    message = refused(
        COMPARE,
        ["""--config.arms.drop={"kind": "upcycle", "overrides": {"total_step": 5}}"""],
        "compare",
    )
    assert message.startswith("unknown field config.arms.drop.overrides.total_step; did you mean ")
    assert "config.arms.drop.overrides.total_steps" in message
    # The arm is merged by compare._merge, which refuses the same names.
    c = load_config(COMPARE, schema="compare")
    arm = {"kind": "dense", "overrides": {"optimizer": {"learnig_rate": 1.0}}}
    with pytest.raises(ConfigError) as e:
        compare_lib._arm_config(c, "x", arm, 0, "/d")
    assert str(e.value).startswith(
        "unknown field arms.x.overrides.optimizer.learnig_rate; did you mean "
        "arms.x.overrides.optimizer.learning_rate"
    )
    with pytest.raises(ConfigError, match=r"^unknown field arms\.x\.overides; did you mean "):
        compare_lib._arm_config(c, "x", {"kind": "dense", "overides": {}}, 0, "/d")


def test_the_compare_schema_is_not_the_run_schema():
    message = refused(COMPARE, ["--config.train.total_stepz=1"], "compare")
    assert "config.train.total_steps" in message
    # A compare config is not a training config.
    assert refused(COMPARE).startswith(f"{COMPARE}: unknown field config.")


# --------------------------------------------------------------------------- wrong types


def test_wrong_type_in_the_file(tmp_path):
    # (a file that starts from default_config() meets ConfigDict's own type check first)
    fresh = "ml_collections.ConfigDict()"
    path = write(tmp_path, 'c.total_steps = "100"\n', fresh)
    assert refused(path) == f"{path}: config.total_steps must be an int, got '100' (str)"
    path = write(tmp_path, "c.optimizer = 3\n", fresh)
    assert refused(path) == f"{path}: config.optimizer must be a section (dict), got 3 (int)"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.total_steps=abc", "config.total_steps must be an int, got 'abc' (str)"),
        ("--config.total_steps=1.5", "config.total_steps must be an int, got 1.5 (float)"),
        ("--config.total_steps=True", "config.total_steps must be an int, got True (bool)"),
        ("--config.checkpoint.async=1", "config.checkpoint.async must be a bool, got 1 (int)"),
        ("--config.eval_at=3", "config.eval_at must be a list, got 3 (int)"),
        ("--config.optimizer.learning_rate=fast", "must be a number, got 'fast' (str)"),
        ("--config.optimizer.clip_grad_norm=abc", "must be a number or None, got 'abc'"),
    ],
)
def test_wrong_type_in_an_override(override, message):
    assert message in refused(f"{TRAIN}:vit", [override])


def test_right_types_are_accepted():
    c = load_config(
        f"{TRAIN}:vit",
        [
            "--config.optimizer.learning_rate=1",  # an int for a float
            "--config.optimizer.clip_grad_norm=None",  # "None = off"
            "--config.optimizer.decay_steps=500",  # a None default takes anything
            "--config.eval_at=(2, 4)",
            "--config.init_from=/some/where",
            "--config.distributed.coordinator_address=10.0.0.5:8476",
        ],
    )
    assert c.optimizer.learning_rate == 1.0 and c.optimizer.clip_grad_norm is None
    assert c.optimizer.decay_steps == 500 and list(c.eval_at) == [2, 4]
    assert c.init_from == "/some/where"
    assert c.distributed.coordinator_address == "10.0.0.5:8476"


# --------------------------------------------------------------------------- what still works


def test_a_known_field_the_file_does_not_list_can_be_overridden():
    c = load_config(
        f"{UPCYCLE}:vit",
        [
            "--config.total_steps=5",
            "--config.optimizer.learning_rate=1e-3",
            "--config.model.moe.layers=[1, 3]",
        ],
    )
    assert c.total_steps == 5 and c.optimizer.to_dict() == {"learning_rate": 1e-3}
    assert c.model.moe.layers == "[1, 3]"  # a string field stays a string
    # The defaults are not merged into the loaded config.
    plain = load_config(f"{UPCYCLE}:vit")
    assert set(plain.keys()) == {"model", "upcycle"}


def test_a_new_arm_can_be_added_on_the_command_line():
    c = load_config(
        COMPARE,
        ['--config.arms.drop={"kind": "upcycle", "overrides": {"upcycle": {"method": "drop"}}}'],
        "compare",
    )
    cfg = compare_lib._arm_config(c, "drop", c.arms.drop, 0, "/dense")
    assert cfg.upcycle.method == "drop" and cfg.upcycle.num_experts == 4


# --------------------------------------------------------------------------- the command line


def test_cli_unknown_field_exits_2_with_one_line(tmp_path, capsys):
    argv = ["train", "--config", f"{TRAIN}:vit", "--workdir", str(tmp_path / "w")]
    code = main([*argv, "--config.steps=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sparse-upcycle: error: unknown field config.steps; did you mean ")
    assert "config.total_steps" in err
    assert not (tmp_path / "w").exists()


def test_cli_compare_uses_the_compare_schema(tmp_path, capsys):
    argv = ["compare", "--config", COMPARE, "--workdir", str(tmp_path / "w")]
    code = main([*argv, "--config.pretrain.stepz=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "unknown field config.pretrain.stepz; did you mean config.pretrain.steps?" in err


# --------------------------------------------------------------------------- shipped configs

ARGS = {
    "upcycle_tiny": ["vit", "t5", "decoder"],
    "llama_moe_8x_top2": ["", "tiny", "tiny_dense"],
    "train_tiny": ["t5", "vit", "decoder", "t5-dense", "vit-dense", "decoder-dense"],
    "compare_tiny": [""],
}
SHIPPED = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    + glob.glob(os.path.join(ROOT, "tests", "configs", "*.py"))
    if not os.path.basename(p).startswith("_")
)


@pytest.mark.parametrize(
    "spec",
    [
        f"{p}:{arg}" if arg else p
        for p in SHIPPED
        for arg in ARGS.get(os.path.basename(p)[:-3], ["", "tiny"])
    ],
    ids=lambda s: os.path.relpath(s, ROOT),
)
def test_every_shipped_config_loads(spec):
    schema = "compare" if os.path.basename(spec).startswith("compare") else "run"
    load_config(spec, schema=schema)
