"""The shipped ``compare`` configs: they load in both sizes, describe the paper's arms, and a
shortened T5 / text run goes through the real pipeline end to end."""

import os

import pytest

from sparse_upcycle import compare as compare_lib
from sparse_upcycle.config import load_config
from sparse_upcycle.data import corpus, fashion_mnist

ROOT = os.path.dirname(os.path.dirname(__file__))
VIT = os.path.join(ROOT, "configs", "compare_vit_fmnist.py")
T5 = os.path.join(ROOT, "configs", "compare_t5_text.py")
BTX = os.path.join(ROOT, "configs", "compare_btx_text.py")
PAPER = os.path.join(ROOT, "configs", "compare_paper_text.py")
PAPER_VIT = os.path.join(ROOT, "configs", "compare_paper_vit.py")
VGROUP = os.path.join(ROOT, "configs", "compare_vgroup_text.py")
DROP = os.path.join(ROOT, "configs", "compare_drop_text.py")
FINETUNE = os.path.join(ROOT, "configs", "compare_finetune_text.py")
HAVE_TEXT = os.path.isdir(corpus.CORPUS_DIR)
HAVE_FMNIST = os.path.isdir(fashion_mnist.DEFAULT_DIR)


@pytest.mark.parametrize("path", [VIT, T5])
@pytest.mark.parametrize("size", ["tiny", None])
def test_configs_load_with_three_seeds_and_the_three_arms(path, size):
    c = load_config(f"{path}:{size}" if size else path, schema="compare")
    assert len(c.seeds) >= 3 and c.extra_compute > 0
    assert {a.kind for a in c.arms.values()} == {"dense", "upcycle", "scratch"}
    assert c.upcycle.method == "copy" and c.upcycle.num_experts >= 8
    assert "upcycle" not in c.train  # the dense model; arms add the recipe
    m = c.train.model
    if m.family == "vit":
        assert m.moe.router == "expert_choice" and c.train.data.name == "fashion_mnist"
    else:
        assert m.encoder_moe.router == "expert_choice" and m.decoder_moe.router == "top_k"
        assert c.train.data.name == "text"
        assert m.overrides.vocab_size == c.train.data.vocab_size + c.train.data.extra_ids


@pytest.mark.parametrize("size", ["tiny", None])
def test_btx_config_has_two_domains_that_cover_the_corpus(size):
    c = load_config(f"{BTX}:{size}" if size else BTX, schema="compare")
    assert len(c.seeds) >= 3 and c.extra_compute > 0
    assert {a.kind for a in c.arms.values()} == {"dense", "upcycle", "btx"}
    branches = c.arms.btx.branches
    assert sorted(str(b.data.to_dict()) for b in branches.values()) == [
        "{'exclude_documents': ['library/*']}",
        "{'include_documents': ['library/*']}",
    ]
    assert c.upcycle.num_experts % len(branches) == 0
    assert c.train.model.family == "decoder" and c.train.data.name == "text"
    if HAVE_TEXT:  # two halves of one corpus, no document in both
        from sparse_upcycle.data.corpus import list_documents

        docs = list_documents(corpus.CORPUS_DIR)
        library = [d for d in docs if d.startswith("library/")]
        assert 0 < len(library) < len(docs)


@pytest.mark.parametrize("size", ["tiny", None])
def test_paper_protocol_config_continues_a_running_schedule(size):
    c = load_config(f"{PAPER}:{size}" if size else PAPER, schema="compare")
    assert c.protocol == "continue" and len(c.seeds) >= 3
    o = c.pretrain.optimizer
    assert o.schedule == "rsqrt" and o.warmup_steps <= c.pretrain.steps // 4
    assert 0 < c.pretrain.eval_every < c.pretrain.steps  # the pre-training curve is drawn
    arms = {n: a.to_dict() for n, a in c.arms.items()}
    assert arms["dense"]["kind"] == "dense"
    assert arms["upcycled_top1"]["overrides"]["model"]["moe"]["k"] == 1
    assert arms["upcycled_e32"]["overrides"]["upcycle"]["num_experts"] == 32
    assert c.train.model.moe.k == 2 and c.upcycle.num_experts == 8
    # the restart protocol on the same checkpoint: a fresh state and a schedule of its own
    for name in ("dense_restart", "upcycled_restart"):
        cfg = compare_lib._arm_config(c, name, c.arms[name], 0, "/dense")
        assert cfg.optimizer.schedule == "cosine" and cfg.optimizer.step_offset == 0
        assert cfg.get("init_opt_state", "reset") == "reset"
    assert arms["upcycled_restart"]["against"] == ["dense_restart", "upcycled"]
    lr2x = compare_lib._arm_config(c, "upcycled_lr2x", c.arms.upcycled_lr2x, 0, "/dense")
    assert lr2x.optimizer.step_offset == c.pretrain.steps  # the continued schedule, twice as high
    assert lr2x.optimizer.learning_rate == 2 * c.pretrain.optimizer.learning_rate


@pytest.mark.parametrize("size", ["tiny", None])
def test_paper_protocol_vit_config_tiles_and_probes(size):
    c = load_config(f"{PAPER_VIT}:{size}" if size else PAPER_VIT, schema="compare")
    assert c.protocol == "continue" and len(c.seeds) >= 3
    assert c.pretrain.optimizer.schedule == "rsqrt" and c.upcycle.optimizer == "tile"
    assert c.train.fewshot.dataset == "digits" and 1 in c.train.fewshot.shots
    arms = {n: a.to_dict() for n, a in c.arms.items()}
    assert arms["upcycled_reset"]["overrides"]["upcycle"]["optimizer"] == "reset"
    assert arms["upcycled_c1"]["overrides"]["model"]["moe"]["capacity_factor"] == 1.0
    assert c.train.model.family == "vit" and c.train.data.name == "fashion_mnist"


@pytest.mark.parametrize("size", ["tiny", None])
def test_virtual_group_config_crosses_ordering_and_scaling(size):
    c = load_config(f"{VGROUP}:{size}" if size else VGROUP, schema="compare")
    assert len(c.seeds) >= 3 and c.extra_compute > 0
    arms = {n: a.to_dict() for n, a in c.arms.items()}
    assert arms["dense"]["kind"] == "dense" and arms["upcycled"]["overrides"] == {}
    grid = set()
    for name, arm in arms.items():
        if not name.startswith("vg_"):
            continue
        up, moe = arm["overrides"]["upcycle"], arm["overrides"]["model"]["moe"]
        assert up["method"] == "virtual_group" and up["k"] % up["granularity"] == 0
        assert moe["ordering"] == up["ordering"] and moe["k"] == up["k"]  # the scale assumes it
        grid.add((up["ordering"], up["scaling"]))
    assert grid == {
        (o, s) for o in ("softmax_then_topk", "topk_then_softmax") for s in ("paper", "none")
    }


@pytest.mark.parametrize("size", ["tiny", None])
def test_drop_config_runs_copies_and_drop_upcycling_four_times_longer(size):
    c = load_config(f"{DROP}:{size}" if size else DROP, schema="compare")
    btx = load_config(f"{BTX}:{size}" if size else BTX, schema="compare")
    assert len(c.seeds) >= 3 and c.extra_compute == 4 * btx.extra_compute
    assert c.pretrain.to_dict() == btx.pretrain.to_dict()  # the same dense checkpoint recipe
    arms = {n: a.to_dict() for n, a in c.arms.items()}
    assert {n: a["kind"] for n, a in arms.items()} == {
        "dense": "dense",
        "upcycled": "upcycle",
        "drop": "upcycle",
    }
    assert c.upcycle.method == "copy" and arms["upcycled"]["overrides"] == {}
    recipe = compare_lib._arm_config(c, "drop", c.arms.drop, 0, "/dense").upcycle
    assert recipe.method == "drop" and recipe.drop_ratio == 0.5
    assert recipe.get("drop_units", "shared") == "shared"  # the paper's one set per expert
    assert arms["drop"]["against"] == ["upcycled"]  # judged against copies, not only dense


@pytest.mark.parametrize("size", ["tiny", None])
def test_finetune_config_scores_every_run_on_the_standard_library(size):
    c = load_config(f"{FINETUNE}:{size}" if size else FINETUNE, schema="compare")
    btx = load_config(f"{BTX}:{size}" if size else BTX, schema="compare")
    assert len(c.seeds) >= 3 and c.extra_compute == btx.extra_compute
    assert c.pretrain.to_dict() == btx.pretrain.to_dict()  # the same dense checkpoint recipe
    f = c.train.finetune  # shared by the dense pre-training and every arm
    assert f.task == "python_stdlib" and f.corpus_dir == "" and not f.every_eval
    assert f.steps >= 20 and 0 < f.warmup_steps < f.steps
    arms = {n: a.to_dict() for n, a in c.arms.items()}
    assert {n: a["kind"] for n, a in arms.items()} == {
        "dense": "dense",
        "upcycled": "upcycle",
        "upcycled_top1": "upcycle",
    }
    top1 = compare_lib._arm_config(c, "upcycled_top1", c.arms.upcycled_top1, 0, "/dense")
    assert top1.model.moe.k == 1 and top1.upcycle.k == 1
    assert top1.finetune.task == "python_stdlib"
    assert arms["upcycled_top1"]["against"] == ["upcycled"]


def test_unknown_size_is_a_config_error():
    with pytest.raises(compare_lib.ConfigError, match="unknown size"):
        load_config(f"{VIT}:huge", schema="compare")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TEXT, reason="python3.11-doc is not installed")
def test_t5_text_compare_runs_end_to_end(tmp_path):
    c = load_config(
        f"{T5}:tiny",
        [
            "--config.pretrain.steps=6",
            "--config.seeds=[0]",
            "--config.train.eval_steps=1",
            "--config.train.log_every=3",
            "--config.num_points=2",
            f"--config.train.data.cache_dir={tmp_path / 'cache'}",
            "--config.train.data.vocab_size=500",
            "--config.train.model.overrides.vocab_size=600",
        ],
        schema="compare",
    )
    report = compare_lib.run_compare(c, str(tmp_path / "w"))
    assert set(report["aggregate"]) == {"dense", "upcycled", "moe_scratch"}
    for run in report["runs"]:
        assert len(run["evals"]) == 2
        assert 0 < run["evals"][-1]["accuracy"] < 1
    assert os.path.exists(report["files"]["png"])
