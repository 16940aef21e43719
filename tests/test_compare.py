"""``sparse-upcycle compare``: equal extra FLOPs per arm, matched evaluation points, seeds,
resuming without recomputation, and the report's numbers (checked against numpy)."""

import json
import os

import numpy as np
import pytest

from sparse_upcycle import compare as compare_lib
from sparse_upcycle import report as report_lib
from sparse_upcycle.cli import main
from sparse_upcycle.config import load_config

HERE = os.path.dirname(__file__)
CONFIG = os.path.join(HERE, "configs", "compare_tiny.py")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("compare"))
    report = compare_lib.run_compare(load_config(CONFIG, schema="compare"), workdir)
    return workdir, report


def test_every_arm_gets_the_same_extra_flops(finished):
    _, report = finished
    budget = report["budget_flops"]
    assert budget == pytest.approx(1.0 * report["dense"]["cost_flops"])
    steps = {}
    for run in report["runs"]:
        total = run["steps"] * run["step_flops"]
        # Whole steps: within half a step of the budget.
        assert abs(total - budget) <= 0.5 * run["step_flops"] + 1
        steps[run["arm"]] = run["steps"]
    assert steps["dense"] == report["dense"]["steps"]  # extra_compute 1.0: as many steps
    assert steps["upcycled"] == steps["moe_scratch"] < steps["dense"]  # MoE steps cost more


def test_evaluations_at_matched_compute_points(finished):
    _, report = finished
    for run in report["runs"]:
        fractions = [row["fraction"] for row in run["evals"]]
        assert len(fractions) == 2
        step = run["step_flops"] / report["dense"]["cost_flops"]
        assert fractions[0] == pytest.approx(0.5, abs=step)
        assert fractions[1] == pytest.approx(1.0, abs=step)


def test_seeds_differ_and_arms_differ(finished):
    _, report = finished
    finals = {(r["arm"], r["seed"]): r["evals"][-1]["loss"] for r in report["runs"]}
    assert len(finals) == 6
    assert finals[("upcycled", 0)] != finals[("upcycled", 1)]
    assert finals[("moe_scratch", 0)] != finals[("moe_scratch", 1)]
    assert finals[("dense", 0)] != finals[("dense", 1)]  # data order


def test_report_numbers_match_numpy(finished):
    workdir, report = finished
    for name in ("dense", "upcycled", "moe_scratch"):
        runs = [r for r in report["runs"] if r["arm"] == name]
        acc = np.array([r["evals"][-1]["accuracy"] for r in runs])
        loss = np.array([r["evals"][-1]["loss"] for r in runs])
        final = report["aggregate"][name]["final"]
        assert final["accuracy"] == pytest.approx(acc.mean())
        assert final["accuracy_std"] == pytest.approx(acc.std(ddof=1))
        assert final["loss"] == pytest.approx(loss.mean())
        text = open(os.path.join(workdir, "report.md")).read()
        assert f"{loss.mean():.4f} ± {loss.std(ddof=1):.4f}" in text
    on_disk = json.load(open(os.path.join(workdir, "report.json")))
    assert on_disk["aggregate"].keys() == report["aggregate"].keys()
    png = open(os.path.join(workdir, "report.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_finished_run_is_not_recomputed(finished, monkeypatch):
    workdir, report = finished
    import sparse_upcycle.loop as train_lib  # the loop compare runs

    calls = []
    real = train_lib.train_and_evaluate

    def counting(cfg, wd):
        calls.append(wd)
        return real(cfg, wd)

    monkeypatch.setattr(train_lib, "train_and_evaluate", counting)
    again = compare_lib.run_compare(load_config(CONFIG, schema="compare"), workdir)
    assert calls == []
    assert again["aggregate"] == report["aggregate"]
    # One arm's result removed: that run alone is redone (it resumes from its checkpoint,
    # so its evaluations are the same).
    os.remove(os.path.join(workdir, "upcycled", "seed_1", "result.json"))
    again = compare_lib.run_compare(load_config(CONFIG, schema="compare"), workdir)
    assert [os.path.relpath(w, workdir) for w in calls] == [os.path.join("upcycled", "seed_1")]


def test_against_adds_verdicts_without_a_run_and_names_only_other_arms(finished, monkeypatch):
    workdir, report = finished
    import ml_collections

    import sparse_upcycle.loop as train_lib

    def forbidden(cfg, wd):
        raise AssertionError(f"{wd} was trained again")

    def with_against(names):
        c = load_config(CONFIG, schema="compare")
        c.arms.moe_scratch = ml_collections.ConfigDict(
            {"kind": "scratch", "overrides": {}, "against": names}
        )
        return c

    monkeypatch.setattr(train_lib, "train_and_evaluate", forbidden)
    # "dense" is judged anyway and "upcycled" is the scratch arm's opponent already: once each
    again = compare_lib.run_compare(with_against(["upcycled", "dense"]), workdir)
    pairs = [(v["a"], v["b"]) for v in again["verdicts"]]
    base = [(v["a"], v["b"]) for v in report["verdicts"]]
    assert sorted(pairs) == sorted(base + [("moe_scratch", "upcycled")])
    assert again["arms"]["moe_scratch"]["against"] == ["upcycled", "dense"]
    (added,) = [v for v in again["verdicts"] if (v["a"], v["b"]) == ("moe_scratch", "upcycled")]
    assert added["paired"]["loss"]["seeds"] == 2
    with open(os.path.join(workdir, "report.md")) as f:
        assert added["text"] in f.read()
    for names, message in [
        (["nope"], r"arms\.moe_scratch\.against: 'nope' is not another arm"),
        (["moe_scratch"], r"arms\.moe_scratch\.against: 'moe_scratch' is not another arm"),
        ("upcycled", r"arms\.moe_scratch\.against must be a list of arm names"),
    ]:
        with pytest.raises(compare_lib.ConfigError, match=message):
            compare_lib.run_compare(with_against(names), workdir)
    compare_lib.run_compare(load_config(CONFIG, schema="compare"), workdir)  # as it was


def test_a_run_from_before_a_new_default_field_is_read_back(finished, monkeypatch):
    """A run config field added after a run started (at its default) does not make that run
    "a different config"; a changed value still does."""
    workdir, _ = finished
    import sparse_upcycle.loop as train_lib

    monkeypatch.setattr(train_lib, "train_and_evaluate", lambda *a: pytest.fail("retrained"))
    report = compare_lib.run_compare(load_config(CONFIG, schema="compare"), workdir)
    path = os.path.join(workdir, "dense", "seed_0", "config.json")
    stored = json.load(open(path))
    old = {k: v for k, v in stored.items() if k not in ("fewshot", "finetune", "init_opt_state")}
    with open(path, "w") as f:
        json.dump(old, f)
    try:
        again = compare_lib.run_compare(load_config(CONFIG, schema="compare"), workdir)
        assert again["aggregate"] == report["aggregate"]
        with open(path, "w") as f:
            json.dump({**old, "eval_steps": 99}, f)
        with pytest.raises(compare_lib.ConfigError, match="holds a run of a different config"):
            compare_lib.run_compare(load_config(CONFIG, schema="compare"), workdir)
    finally:
        with open(path, "w") as f:
            json.dump(stored, f)


def _arm(kind, acc, sd, seeds=3):
    final = {"accuracy": acc, "accuracy_std": sd, "loss": 1 - acc, "seeds": seeds}
    return {"kind": kind, "final": final}


def test_verdicts():
    arms = {
        "dense": _arm("dense", 0.80, 0.01),
        "up": _arm("upcycle", 0.83, 0.01),
        "scratch": _arm("scratch", 0.825, 0.01),
    }
    by_pair = {(v["a"], v["b"]): v["verdict"] for v in report_lib.verdicts(arms)}
    assert by_pair == {
        ("up", "dense"): "beats",
        ("up", "scratch"): "is within the seed spread of",
        ("scratch", "dense"): "beats",
    }
    arms["dense"] = _arm("dense", 0.80, 0.05)
    assert report_lib.verdicts(arms)[0]["verdict"] == "is within the seed spread of"
    arms["up"] = _arm("upcycle", 0.70, 0.01, seeds=1)
    assert "one seed" in report_lib.verdicts(arms)[0]["verdict"]


def test_paired_verdict_is_the_t_test_on_per_seed_differences():
    def arm(kind, losses, accs):
        per_seed = {
            str(s): {"loss": x, "accuracy": y}
            for s, (x, y) in enumerate(zip(losses, accs, strict=True))
        }
        final = {
            "loss": float(np.mean(losses)),
            "loss_std": float(np.std(losses, ddof=1)),
            "accuracy": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs, ddof=1)),
            "seeds": len(losses),
        }
        return {"kind": kind, "final": final, "final_per_seed": per_seed}

    arms = {
        "dense": arm("dense", [3.191, 3.206, 3.210], [0.36, 0.357, 0.357]),
        "up": arm("upcycle", [3.191, 3.190, 3.205], [0.362, 0.362, 0.357]),
    }
    (v,) = report_lib.verdicts(arms)
    d = np.array([0.0, -0.016, -0.005])
    got = v["paired"]["loss"]
    assert got["seeds"] == 3 and got["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert got["std"] == pytest.approx(d.std(ddof=1), abs=1e-12)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(3))
    assert got["t"] == pytest.approx(t, rel=1e-9)
    # Student's t with 2 degrees of freedom: P(|T| > t) = 1 - |t| / sqrt(t^2 + 2)
    assert got["p"] == pytest.approx(1 - abs(t) / np.sqrt(t * t + 2), rel=1e-9)
    assert "paired over 3 seeds: loss -0.0070" in v["text"]
    arms["up"]["final_per_seed"] = {"0": arms["up"]["final_per_seed"]["0"]}
    (v,) = report_lib.verdicts(arms)
    assert v["paired"] == {"loss": None, "accuracy": None} and "paired" not in v["text"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.arms.dense.kind=bogus", "arms.dense.kind must be one of"),
        ("--config.seeds=[]", "seeds is empty"),
        ("--config.extra_compute=0.0", "extra_compute must be > 0"),
        ("--config.train.data.name=nope", "unknown data.name 'nope'"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, override, message):
    code = main(["compare", "--config", CONFIG, "--workdir", str(tmp_path / "w"), override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err


def test_arm_overrides_merge_into_the_run_config():
    c = load_config(CONFIG, schema="compare")
    arm = {
        "kind": "upcycle",
        "overrides": {"upcycle": {"method": "drop"}, "optimizer": {"learning_rate": 1e-4}},
    }
    cfg = compare_lib._arm_config(c, "drop", arm, 2, "/dense")
    assert cfg.upcycle.method == "drop" and cfg.upcycle.num_experts == 4  # merged, not replaced
    assert cfg.optimizer.learning_rate == 1e-4 and cfg.optimizer.name == "adamw"
    assert (cfg.seed, cfg.data.seed, cfg.upcycle.seed, cfg.init_from) == (2, 2, 2, "/dense")
    scratch = compare_lib._arm_config(c, "s", {"kind": "scratch"}, 0, "/dense")
    assert scratch.init_from == "scratch" and "upcycle" in scratch
    dense = compare_lib._arm_config(c, "d", {"kind": "dense"}, 0, "/dense")
    assert dense.init_from == "/dense" and "upcycle" not in dense
    with pytest.raises(compare_lib.ConfigError, match="arm override 'optimizer.learning_rate'"):
        compare_lib._arm_config(
            c,
            "x",
            {"kind": "dense", "overrides": {"optimizer": {"learning_rate": "fast"}}},
            0,
            "/d",
        )


def test_a_changed_config_is_refused_not_mixed_in(finished, capsys):
    workdir, _ = finished
    code = main(
        [
            "compare",
            "--config",
            CONFIG,
            "--workdir",
            workdir,
            "--config.train.optimizer.learning_rate=0.1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "holds a run of a different config" in err[-1] and "optimizer" in err[-1]


def test_a_second_compare_in_the_same_workdir_is_refused(tmp_path):
    import fcntl

    os.makedirs(tmp_path / "w")
    with open(tmp_path / "w" / ".compare.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(compare_lib.ConfigError, match="another compare is running"):
            compare_lib.run_compare(load_config(CONFIG, schema="compare"), str(tmp_path / "w"))


# --------------------------------------------------------------------------------------------
# Branch-Train-MiX arms
# --------------------------------------------------------------------------------------------

BTX_CONFIG = os.path.join(HERE, "configs", "compare_btx_tiny.py")


@pytest.fixture(scope="module")
def btx(tmp_path_factory):
    from test_data_text import _make_corpus

    corpus = tmp_path_factory.mktemp("btx_corpus")
    _make_corpus(corpus)
    cache = tmp_path_factory.mktemp("btx_cache")
    overrides = [
        f"--config.train.data.corpus_dir={corpus}",
        f"--config.train.data.cache_dir={cache}",
    ]
    workdir = str(tmp_path_factory.mktemp("btx_compare"))
    config = load_config(BTX_CONFIG, overrides, schema="compare")
    return workdir, compare_lib.run_compare(config, workdir), overrides


def test_btx_branches_spend_their_share_and_the_moe_the_rest(btx):
    workdir, report, _ = btx
    budget, dense_flops = report["budget_flops"], report["dense"]["step_flops"]
    (run,) = [r for r in report["runs"] if r["arm"] == "btx"]
    here = os.path.join(workdir, "btx", "seed_0")
    steps = run["branches"]["steps"]
    assert set(steps) == {"zero", "rest"}
    for branch, n in steps.items():  # each branch: a quarter of the budget in dense steps
        assert abs(n * dense_flops - budget / 4) <= dense_flops / 2
        with open(os.path.join(here, f"branch_{branch}", "config.json")) as f:
            data = json.load(f)["data"]
        assert data.get("include_documents" if branch == "zero" else "exclude_documents") == [
            "part0/*"
        ]
    spent = sum(steps.values()) * dense_flops
    assert run["branches"]["flops"] == spent
    assert run["evals"][-1]["extra_flops"] == spent + run["steps"] * run["step_flops"]
    assert abs(run["evals"][-1]["extra_flops"] - budget) <= run["step_flops"] / 2
    # the MoE as mixed (at the branches' share, 2/4 of the budget), then the matched points
    # past it: 3/4 and 4/4
    assert [round(e["extra_flops"] / budget * 4) for e in run["evals"]] == [2, 3, 4]
    assert run["evals"][0]["step"] == 0 and run["evals"][0]["extra_flops"] == spent
    # the MoE starts from the branches' last checkpoints, two experts each, the rest averaged
    with open(os.path.join(here, "moe", "config.json")) as f:
        moe = json.load(f)
    sources = [os.path.join(here, f"branch_{b}", "checkpoints", str(steps[b])) for b in steps]
    assert moe["upcycle"]["sources"] == sources and all(os.path.isdir(p) for p in sources)
    assert moe["init_from"] == sources[0]
    assert moe["upcycle"]["experts_per_source"] == 2
    assert moe["upcycle"]["non_expert"] == "average"
    assert "include_documents" not in moe["data"] and "exclude_documents" not in moe["data"]
    texts = [v["text"] for v in report["verdicts"]]
    assert any(t.startswith("btx ") and " dense:" in t for t in texts)
    assert any(t.startswith("btx ") and " upcycled:" in t for t in texts)


def test_btx_resumes_without_recomputing(btx, monkeypatch):
    workdir, report, overrides = btx
    from sparse_upcycle import loop

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "train_and_evaluate", forbidden)
    again = compare_lib.run_compare(load_config(BTX_CONFIG, overrides, schema="compare"), workdir)
    assert again["aggregate"]["btx"] == report["aggregate"]["btx"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.arms.btx.branch_compute=1.0", r"arms\.btx\.branch_compute must be in \(0, 1\)"),
        ("--config.arms.btx.branches={'only': {}}", r"arms\.btx\.branches must name at least two"),
        ("--config.upcycle.num_experts=3", r"upcycle\.num_experts 3 is not a multiple of the 2"),
        ("--config.arms.dense.branch_compute=0.5", r"arms\.dense\.branch_compute is for kind btx"),
        (
            "--config.arms.btx.branches.zero.data.include_documentz=[]",
            "include_documentz",
        ),
    ],
)
def test_btx_bad_config_is_one_line(btx, tmp_path, capsys, override, message):
    _, _, overrides = btx
    workdir = str(tmp_path / "w")
    argv = ["compare", "--config", BTX_CONFIG, "--workdir", workdir, *overrides, override]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and __import__("re").search(message, err[0]), err
