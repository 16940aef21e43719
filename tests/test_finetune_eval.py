"""Downstream fine-tuning (finetune_eval.py): the task's documents and vocabulary, a decoder
run that reports the fine-tuned scores at its end only and keeps its own parameters, the
refusals, and the scores in compare's report."""

import json
import os
import pathlib

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparse_upcycle import finetune_eval, report
from sparse_upcycle.cli import main
from sparse_upcycle.config import load_config
from sparse_upcycle.data import corpus as text_corpus
from sparse_upcycle.train import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "configs", "train_tiny.py")
PIECES = 150
CODE = """def {name}(value, items=None):
    '''Return the {name} of value over items.'''
    items = list(items or [])
    for item in items:
        if item is None:
            continue
        value = value + len(str(item))
    return value


class {cls}:
    def __init__(self, size):
        self.size = size

    def read(self, path):
        with open(path) as f:
            return f.read(self.size)
"""


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(docs corpus, fake standard library, cache): the library has modules at the top, in a
    package, and below test/ and site-packages/ (left out)."""
    from test_data_text import _make_corpus

    docs = tmp_path_factory.mktemp("docs")
    _make_corpus(docs)
    lib = tmp_path_factory.mktemp("stdlib")
    for j in range(60):
        rel = [f"mod{j:02d}.py", f"pkg/sub{j:02d}.py"][j % 2]
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(CODE.format(name=f"total{j}", cls=f"Reader{j}"), encoding="utf-8")
    for skipped in ("test/test_mod.py", "site-packages/other/x.py", "pkg/tests/t.py"):
        (lib / skipped).parent.mkdir(parents=True, exist_ok=True)
        (lib / skipped).write_text("print('left out')\n", encoding="utf-8")
    (lib / "notes.txt").write_text("not a module")
    return docs, lib, tmp_path_factory.mktemp("cache")


def _overrides(dirs, *finetune):
    docs, lib, cache = dirs
    return [
        "--config.data.name=text",
        f"--config.data.vocab_size={PIECES}",
        f"--config.data.corpus_dir={docs}",
        f"--config.data.cache_dir={cache}",
        "--config.model.overrides.vocab_size=160",
        "--config.finetune.task=python_stdlib",
        f"--config.finetune.corpus_dir={lib}",
        *finetune,
    ]


def test_the_task_documents_and_vocabulary(dirs):
    docs, lib, cache = dirs
    data = load_config(f"{TRAIN}:decoder-dense", _overrides(dirs)).data
    entry = finetune_eval.task_entry(data, "python_stdlib", str(lib))
    vocab = text_corpus.prepare_corpus(docs, PIECES, cache)
    assert (entry / "spm.model").read_bytes() == (vocab / "spm.model").read_bytes()
    listed = {}
    for split in ("train", "validation", "test"):
        counts = json.loads((entry / f"{split}.docs.json").read_text())
        listed[split] = [rel for rel, _ in counts]
        assert all(text_corpus.split_of(rel) == split for rel in listed[split])
    every = sorted(rel for rels in listed.values() for rel in rels)
    assert every == sorted(
        [f"mod{j:02d}.py" for j in range(0, 60, 2)]
        + [f"pkg/sub{j:02d}.py" for j in range(1, 60, 2)]
    )
    assert listed["validation"]  # 60 files: the hash puts a few there
    sp = text_corpus.load_vocab(entry)
    first = listed["validation"][0]
    stream = np.asarray(text_corpus.load_stream(entry, "validation"))
    n = json.loads((entry / "validation.docs.json").read_text())[0][1]
    assert stream[n - 1] == text_corpus.EOS_ID
    source = (lib / first).read_text()
    assert sp.decode(stream[: n - 1].tolist()) == sp.decode(sp.encode(source))


def _run(dirs, workdir, *finetune):
    cfg = load_config(f"{TRAIN}:decoder-dense", _overrides(dirs, *finetune))
    assert train_and_evaluate(cfg, str(workdir))["status"] == "done"
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if r["split"] == "eval"}


def _final_params(workdir):
    path = pathlib.Path(workdir) / "checkpoints" / "6" / "state"
    return ocp.StandardCheckpointer().restore(path)["params"]


def test_a_run_fine_tunes_at_its_end_and_keeps_its_parameters(dirs, tmp_path):
    tuned = _run(
        dirs,
        tmp_path / "tuned",
        "--config.eval_at=[0,3]",
        "--config.finetune.steps=30",
        "--config.finetune.learning_rate=3e-3",
        "--config.finetune.eval_batches=2",
    )
    # a rate too small to move anything: the task's score of the run's own parameters
    still = _run(
        dirs,
        tmp_path / "still",
        "--config.eval_at=[0,3]",
        "--config.finetune.steps=1",
        "--config.finetune.warmup_steps=0",
        "--config.finetune.learning_rate=1e-12",
        "--config.finetune.eval_batches=2",
    )
    assert sorted(tuned) == [0, 3, 6]
    assert not any(k.startswith("finetune/") for r in (tuned[0], tuned[3]) for k in r)
    key = "finetune/python_stdlib_loss"
    assert 0 < tuned[6][key] < still[6][key] - 0.1, (tuned[6][key], still[6][key])
    assert 0 <= tuned[6]["finetune/python_stdlib_accuracy"] <= 1
    assert tuned[6]["loss"] == still[6]["loss"]  # the run itself is the same run
    a, b = _final_params(tmp_path / "tuned"), _final_params(tmp_path / "still")
    flat_a, flat_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--config.finetune.task=glue"], "finetune.task must be one of"),
        (["--config.finetune.steps=0"], "finetune needs steps >= 1"),
        (["--config.finetune.warmup_steps=500"], "0 <= warmup_steps <= steps"),
        (["--config.data.name=synthetic"], "only data.name='text' has"),
    ],
)
def test_refusals_are_one_line(dirs, tmp_path, capsys, extra, says):
    workdir = tmp_path / "w"
    args = ["train", "--config", f"{TRAIN}:decoder-dense", "--workdir", str(workdir)]
    assert main([*args, *_overrides(dirs), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not workdir.exists()


def test_a_task_too_small_for_one_batch_is_refused(dirs, tmp_path, capsys):
    lib = tmp_path / "lib"
    lib.mkdir()
    for j in range(40):  # a name for each split, each file a few tokens
        (lib / f"m{j}.py").write_text("x = 1\n")
    overrides = [*_overrides(dirs), f"--config.finetune.corpus_dir={lib}"]
    data = load_config(f"{TRAIN}:decoder-dense", overrides).data
    finetune_eval.task_entry(data, "python_stdlib", str(lib))  # encoded (and logged) here
    capsys.readouterr()
    args = ["train", "--config", f"{TRAIN}:decoder-dense", "--workdir", str(tmp_path / "w")]
    assert main([*args, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "finetune.task 'python_stdlib'" in err and "too few" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "w").exists()


def _fake_run(arm, kind, seed, loss, tuned):
    final = {"step": 4, "fraction": 1.0, "extra_flops": 1.0, "loss": loss, "accuracy": 0.5}
    final.update({"finetune/t_loss": tuned, "finetune/t_accuracy": 0.4, "finetune/t_seconds": 1})
    early = {"step": 2, "fraction": 0.5, "extra_flops": 0.5, "loss": loss + 1, "accuracy": 0.4}
    return {
        "arm": arm,
        "kind": kind,
        "seed": seed,
        "steps": 4,
        "step_flops": 1.0,
        "wall_seconds": 1.0,
        "evals": [early, final],
    }


def test_the_report_carries_the_fine_tuned_scores_and_their_paired_verdict(tmp_path):
    runs = [_fake_run("dense", "dense", s, 3.0 + 0.1 * s, 2.0 + 0.1 * s) for s in range(3)]
    runs += [
        _fake_run("moe", "upcycle", s, 3.1 + 0.1 * s, 2.5 + 0.1 * s + 0.01 * s * s)
        for s in range(3)
    ]
    agg = report.aggregate({"runs": runs})
    final, early = agg["moe"]["final"], agg["moe"]["curve"][0]
    assert final["finetune/t_loss"] == pytest.approx(np.mean([2.5, 2.61, 2.74]))
    assert final["finetune/t_loss_std"] == pytest.approx(np.std([2.5, 2.61, 2.74], ddof=1))
    assert "finetune/t_seconds" not in final and "finetune/t_loss" not in early
    (v,) = report.verdicts(agg)
    d = np.array([0.5, 0.51, 0.54])  # moe - dense, by seed
    assert v["paired"]["finetune/t_loss"]["mean"] == pytest.approx(d.mean())
    assert v["paired"]["finetune/t_loss"]["std"] == pytest.approx(d.std(ddof=1))
    assert "t_loss 2.6167 vs 2.1000" in v["text"]
    dense = {"steps": 10, "cost_flops": 1.0, "family": "decoder", "evals": [runs[0]["evals"][1]]}
    md = report.markdown(
        {
            "dense": dense,
            "aggregate": agg,
            "verdicts": [v],
            "extra_compute": 1.0,
            "budget_flops": 1.0,
            "seeds": [0, 1, 2],
        }
    )
    assert "| arm | t_loss | t_accuracy |" in md
    assert "| dense checkpoint | 2.0000 | 0.4000 |" in md
    assert "| moe | 2.6167 ± 0.1201 | 0.4000 ± 0.0000 |" in md
    full = {"dense": dense, "aggregate": agg, "seeds": [0, 1, 2]}
    report.plot(full, str(tmp_path / "report.png"))  # with the downstream panel
    assert (tmp_path / "report.png").stat().st_size > 10_000
