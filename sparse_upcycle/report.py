"""The report of a ``compare`` experiment: ``report.json`` (every run's evaluations and the
aggregates), ``report.md`` (the table and the verdicts) and ``report.png`` (validation loss
and accuracy vs extra compute as a fraction of the dense pre-training cost, mean over seeds
with a ±1 standard deviation band; Komatsuzaki et al. 2023, Figure 2 style).

Spread: the sample standard deviation over seeds (ddof = 1). A verdict says an arm beats or
loses to another when the difference of the seed means exceeds the larger of the two arms'
standard deviations, and "within the seed spread" otherwise; it is a plain rule of thumb, not a
significance test, and the table gives the numbers to judge by. Beside it, the comparison
paired by seed (each seed fixes an arm's data order and, for the MoE arms, the recipe's and
router's draws; every arm starts from the same dense checkpoint): the mean and standard
deviation of the per-seed differences at the end of the budget and the paired t-test's
two-sided p-value (Student 1908; ``scipy.stats.ttest_rel``), for loss and accuracy.
"""

from __future__ import annotations

import json
import os

import numpy as np


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _probe_keys(rows) -> list[str]:
    """The few-shot accuracies every row has (``fewshot/<dataset>_<k>shot``), in shot order."""
    common = set.intersection(*(set(r) for r in rows)) if rows else set()
    keys = [k for k in common if k.startswith("fewshot/") and not k.endswith("_std")]
    return sorted(keys, key=lambda k: (k.rpartition("_")[0], int(k.rpartition("_")[2][:-4])))


def _finetune_keys(rows) -> list[str]:
    """The fine-tuned scores every row has (``finetune/<task>_loss`` / ``_accuracy``)."""
    common = set.intersection(*(set(r) for r in rows)) if rows else set()
    keys = [k for k in common if k.startswith("finetune/") and k.endswith(("_loss", "_accuracy"))]
    return sorted(keys, key=lambda k: (k.rpartition("_")[0], k.endswith("_accuracy")))  # loss first


def aggregate(report: dict) -> dict:
    """Per arm: the curve (mean/std over seeds at each matched compute point) and the final
    point."""
    arms: dict[str, dict] = {}
    for run in report["runs"]:
        arms.setdefault(run["arm"], {"kind": run["kind"], "runs": []})["runs"].append(run)
    out = {}
    for name, arm in arms.items():
        by_step: dict[int, list[dict]] = {}
        for run in arm["runs"]:
            for row in run["evals"]:
                by_step.setdefault(row["step"], []).append(row)
        curve = []
        for step in sorted(by_step):
            rows = by_step[step]
            loss, loss_sd = _mean_std([r["loss"] for r in rows])
            acc, acc_sd = _mean_std([r["accuracy"] for r in rows])
            point = {
                "step": step,
                "fraction": rows[0]["fraction"],
                "extra_flops": rows[0]["extra_flops"],
                "loss": loss,
                "loss_std": loss_sd,
                "accuracy": acc,
                "accuracy_std": acc_sd,
                "seeds": len(rows),
            }
            # few-shot probes (fewshot.py) and fine-tuned scores (finetune_eval.py), when run
            for key in _probe_keys(rows) + _finetune_keys(rows):
                point[key], point[f"{key}_std"] = _mean_std([r[key] for r in rows])
            curve.append(point)
        walls = [r["wall_seconds"] for r in arm["runs"] if r.get("wall_seconds") is not None]
        out[name] = {
            "kind": arm["kind"],
            "steps": arm["runs"][0]["steps"],
            "step_flops": arm["runs"][0]["step_flops"],
            "wall_seconds": float(np.mean(walls)) if walls else None,
            "curve": curve,
            "final": curve[-1] if curve else None,
            "final_per_seed": {str(r["seed"]): r["evals"][-1] for r in arm["runs"] if r["evals"]},
        }
    return out


def paired(a: dict, b: dict, key: str) -> dict | None:
    """``key`` of arm ``a`` minus arm ``b`` at the end of the budget, paired by seed: mean and
    std (ddof = 1) of the differences, the paired t statistic and its two-sided p-value; None
    with fewer than two common seeds."""
    pa, pb = a.get("final_per_seed") or {}, b.get("final_per_seed") or {}
    seeds = sorted(set(pa) & set(pb), key=int)
    if len(seeds) < 2:
        return None
    from scipy import stats

    x = np.array([pa[s][key] for s in seeds], np.float64)
    y = np.array([pb[s][key] for s in seeds], np.float64)
    d = x - y
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # identical differences: t is undefined
        t, p = (0.0, 1.0) if d[0] == 0 else (float(np.sign(d[0]) * np.inf), 0.0)
    else:
        res = stats.ttest_rel(x, y)
        t, p = float(res.statistic), float(res.pvalue)
    return {"seeds": len(seeds), "mean": float(d.mean()), "std": sd, "t": t, "p": p}


def _verdict(name_a: str, a: dict, name_b: str, b: dict) -> dict:
    fa, fb = a["final"], b["final"]
    gap = fa["accuracy"] - fb["accuracy"]
    loss_gap = fa["loss"] - fb["loss"]
    spread = max(fa["accuracy_std"], fb["accuracy_std"])
    if fa["seeds"] < 2 or fb["seeds"] < 2:
        word = "(one seed: no spread to judge by) vs"
    elif abs(gap) > spread:
        word = "beats" if gap > 0 else "loses to"
    else:
        word = "is within the seed spread of"
    text = (
        f"{name_a} {word} {name_b}: accuracy {fa['accuracy']:.4f} vs {fb['accuracy']:.4f} "
        f"({gap:+.4f}; larger seed std {spread:.4f}), loss {fa['loss']:.4f} vs "
        f"{fb['loss']:.4f} ({loss_gap:+.4f})"
    )
    by_seed = {k: paired(a, b, k) for k in ("loss", "accuracy")}
    if by_seed["loss"] and by_seed["accuracy"]:
        pl, pa = by_seed["loss"], by_seed["accuracy"]
        text += (
            f"; paired over {pl['seeds']} seeds: loss {pl['mean']:+.4f} ± {pl['std']:.4f} "
            f"(p = {pl['p']:.2f}), accuracy {pa['mean']:+.4f} ± {pa['std']:.4f} "
            f"(p = {pa['p']:.2f})"
        )
    for key in _finetune_keys([fa, fb]):  # the downstream scores, when both arms have them
        by_seed[key] = pk = paired(a, b, key)
        text += f"; {key.removeprefix('finetune/')} {fa[key]:.4f} vs {fb[key]:.4f}"
        if pk:
            text += f" (paired {pk['mean']:+.4f} ± {pk['std']:.4f}, p = {pk['p']:.2f})"
    return {
        "paired": by_seed,
        "a": name_a,
        "b": name_b,
        "accuracy_gap": gap,
        "loss_gap": loss_gap,
        "spread": spread,
        "verdict": word,
        "text": text,
    }


def verdicts(arms: dict, against: dict[str, list[str]] | None = None) -> list[dict]:
    """Each MoE arm against dense continuation; each upcycled arm against MoE from scratch;
    each Branch-Train-MiX arm against the single-source upcycled ones; and each arm against
    the arms its ``against`` names (``compare.py``), in that order, each pair once."""
    dense = [n for n, a in arms.items() if a["kind"] == "dense"]
    scratch = [n for n, a in arms.items() if a["kind"] == "scratch"]
    upcycled = [n for n, a in arms.items() if a["kind"] == "upcycle"]
    also = {"upcycle": scratch, "btx": upcycled}
    out, seen = [], set()
    for name, arm in arms.items():
        others = [] if arm["kind"] == "dense" else dense + also.get(arm["kind"], [])
        for other in others + list((against or {}).get(name, [])):
            if (name, other) in seen or other not in arms:
                continue
            seen.add((name, other))
            if arm["final"] and arms[other]["final"]:
                out.append(_verdict(name, arm, other, arms[other]))
    return out


def markdown(report: dict) -> str:
    d = report["dense"]
    lines = [
        "# Upcycling comparison",
        "",
        f"Dense model: {d['steps']} pre-training steps, {d['cost_flops']:.3g} training FLOPs "
        f"({d['family']}). Extra budget per arm: {report['extra_compute']:g} × that "
        f"({report['budget_flops']:.3g} FLOPs). Seeds: {report['seeds']}.",
    ]
    if report.get("protocol") == "continue":
        lines.append(
            "Protocol: continue (every arm goes on with the pre-training schedule; dense "
            "continuation carries the optimizer state)."
        )
    if d["evals"]:
        last = d["evals"][-1]
        lines.append(
            f"Dense checkpoint on the held-out split: loss {last['loss']:.4f}, "
            f"accuracy {last['accuracy']:.4f}."
        )
    lines += [
        "",
        "| arm | kind | steps | extra FLOPs (× dense) | wall time / seed | "
        "val loss (mean ± std) | val accuracy (mean ± std) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in report["aggregate"].items():
        f = arm["final"]
        if not f:
            continue
        wall = f"{arm['wall_seconds']:.0f} s" if arm["wall_seconds"] is not None else "—"
        lines.append(
            f"| {name} | {arm['kind']} | {arm['steps']} | {f['extra_flops']:.3g} "
            f"({f['fraction']:.3f}) | {wall} | {f['loss']:.4f} ± {f['loss_std']:.4f} | "
            f"{f['accuracy']:.4f} ± {f['accuracy_std']:.4f} |"
        )
    probes = _probe_keys([a["final"] for a in report["aggregate"].values() if a["final"]])
    if probes:
        lines += [
            "",
            "Few-shot linear probes on the pre-logit features (test accuracy, mean ± std over "
            "seeds; `fewshot.py`), at each matched compute point:",
            "",
            "| arm | extra compute | "
            + " | ".join(k.removeprefix("fewshot/") for k in probes)
            + " |",
            "|---|---|" + "---|" * len(probes),
        ]
        start = report["dense"]["evals"][-1] if report["dense"]["evals"] else {}
        if all(k in start for k in probes):
            cells = " | ".join(f"{start[k]:.4f}" for k in probes)
            lines.append(f"| dense checkpoint | 0 | {cells} |")
        for name, arm in report["aggregate"].items():
            for p in arm["curve"]:
                if not all(k in p for k in probes):
                    continue
                cells = " | ".join(f"{p[k]:.4f} ± {p[f'{k}_std']:.4f}" for k in probes)
                lines.append(f"| {name} | {p['fraction']:.3f} | {cells} |")
    tuned = _finetune_keys([a["final"] for a in report["aggregate"].values() if a["final"]])
    if tuned:
        lines += [
            "",
            "Fine-tuned on the downstream task at the end of the budget (held-out scores, mean "
            "± std over seeds; `finetune_eval.py`):",
            "",
            "| arm | " + " | ".join(k.removeprefix("finetune/") for k in tuned) + " |",
            "|---|" + "---|" * len(tuned),
        ]
        start = report["dense"]["evals"][-1] if report["dense"]["evals"] else {}
        if all(k in start for k in tuned):
            lines.append(
                "| dense checkpoint | " + " | ".join(f"{start[k]:.4f}" for k in tuned) + " |"
            )
        for name, arm in report["aggregate"].items():
            f = arm["final"]
            if f and all(k in f for k in tuned):
                cells = " | ".join(f"{f[k]:.4f} ± {f[f'{k}_std']:.4f}" for k in tuned)
                lines.append(f"| {name} | {cells} |")
    lines += ["", "At the end of the budget:", ""]
    lines += [f"- {v['text']}" for v in report["verdicts"]]
    lines += [
        "",
        "Wall time includes compilation and the evaluations. Matched compute points "
        "(validation at k/N of the budget) are in `report.json` and `report.png`.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pretraining = report["dense"]["evals"]
    curve_panel = len(pretraining) >= 2  # pre-training evaluated along the way
    finals = {n: a["final"] for n, a in report["aggregate"].items() if a["final"]}
    tuned = [k for k in _finetune_keys(list(finals.values())) if k.endswith("_loss")]
    panels = 2 + curve_panel + bool(tuned)
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels + 0.2, 4.2))
    start = pretraining[-1] if pretraining else None
    for i, (name, arm) in enumerate(report["aggregate"].items()):
        color = f"C{i}"
        curve = list(arm["curve"])
        # from the dense checkpoint at 0, except the arms that do not start from it there (a
        # btx arm's MoE exists only once its branches have spent their share)
        if start is not None and arm["kind"] not in ("scratch", "btx"):
            curve = [{**start, "fraction": 0.0, "loss_std": 0.0, "accuracy_std": 0.0}] + curve
        x = np.array([p["fraction"] for p in curve])
        for ax, key in zip(axes[:2], ("loss", "accuracy"), strict=True):
            y = np.array([p[key] for p in curve])
            sd = np.array([p[f"{key}_std"] for p in curve])
            ax.plot(x, y, marker="o", ms=3, color=color, label=f"{name} ({arm['kind']})")
            ax.fill_between(x, y - sd, y + sd, color=color, alpha=0.2, linewidth=0)
    for ax, key in zip(axes[:2], ("validation loss", "validation accuracy"), strict=True):
        ax.set_xlabel("extra compute (fraction of dense pre-training FLOPs)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if curve_panel:
        ax = axes[2]
        ax.plot([e["step"] for e in pretraining], [e["loss"] for e in pretraining], "k.-")
        ax.set_xlabel("dense pre-training step")
        ax.set_ylabel("validation loss")
        ax.set_title("the dense checkpoint's pre-training", fontsize=9)
        ax.grid(alpha=0.3)
    if tuned:  # the downstream fine-tuned loss of every arm at the end of its budget
        ax, key = axes[-1], tuned[0]
        names = list(finals)
        ax.bar(
            range(len(names)),
            [finals[n][key] for n in names],
            yerr=[finals[n][f"{key}_std"] for n in names],
            color=[f"C{i}" for i in range(len(names))],
            capsize=4,
        )
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        start = pretraining[-1] if pretraining else {}
        if key in start:
            ax.axhline(start[key], color="k", ls="--", lw=1, label="dense checkpoint")
            ax.legend(fontsize=8)
        values = [finals[n][key] for n in names] + ([start[key]] if key in start else [])
        pad = 0.1 * (max(values) - min(values)) + 0.01
        ax.set_ylim(min(values) - 2 * pad, max(values) + pad)
        ax.set_ylabel(f"{key.removeprefix('finetune/')} after fine-tuning")
        ax.set_title("downstream, at the end of the budget", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    n = len(report["seeds"])
    fig.suptitle(f"{report['dense']['family']}: mean over {n} seeds, band = ±1 std", fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report: dict, workdir: str) -> dict:
    """Add the aggregates and verdicts to ``report`` and write the three files."""
    report = dict(report)
    report["aggregate"] = aggregate(report)
    against = {n: a.get("against", []) for n, a in report.get("arms", {}).items()}
    report["verdicts"] = verdicts(report["aggregate"], against)
    paths = {k: os.path.join(workdir, f"report.{k}") for k in ("json", "md", "png")}
    report["files"] = paths
    tmp = f"{paths['json']}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=float)
    os.replace(tmp, paths["json"])
    text = markdown(report)
    with open(paths["md"] + ".tmp", "w") as f:
        f.write(text)
    os.replace(paths["md"] + ".tmp", paths["md"])
    plot(report, paths["png"])
    report["markdown"] = text
    return report
