"""``sparse-upcycle inspect CHECKPOINT --routing --config C``: what the routers of an MoE do on
validation data, so that a result can be explained by a measured mechanism.

The checkpoint (a ``train`` step directory, an ``upcycle`` output, or ``init``: the run's
initial parameters, i.e. ``init_from`` upcycled in memory with the config's recipe and seed,
as ``train`` builds them at step 0) runs the config's model on the first ``--batches``
validation batches with the evaluation router (``train=False``). Every MoE layer's routing
decision is recorded (``routing.dense_combine_weights``: the weight each token gets from each
expert; an *assignment* is a (token, expert) pair with a weight > 0). Per layer:

* ``load``: the fraction of assignments each expert takes (sums to 1), and its max/min over
  the mean (``max_ratio``, ``min_ratio``: 1 is perfectly balanced);
* ``dropped_fraction``, ``entropy`` (of the router's probabilities over experts, nats) and
  ``top1_prob``: the router's own metrics (``routing.RouterMetrics``), averaged over batches;
* what each expert takes. Images (ViT): the class × expert assignment counts (every patch of
  an image counts for its label), drawn as a heatmap with each class's row normalised. Text:
  the token × expert counts (the input token at the routed position; T5's encoder layers see
  the encoder input, its decoder layers the decoder input) and each expert's most frequent
  tokens with their share of that expert's assignments.
* ``expert_spread``, ``expert_drift``, ``router_kernel_rms``: how far the experts are apart
  and from the first checkpoint inspected, and the router's scale (``_weight_stats``);
* ``mutual_information_bits``: I(class; expert), or I(token; expert), of the assignment counts,
  and that as a fraction of H(expert) (``mi_over_expert_entropy``): 0 when routing ignores the
  class or token, 1 when the expert is a function of it. The plug-in estimate is biased up by
  about (X-1)(E-1) / (2 N ln 2) bits for X classes or tokens, E experts and N assignments
  (Miller 1955); ``mi_bias_bits`` gives that figure, so compare checkpoints on the same data.

``--start`` adds a second checkpoint (typically ``init``, the upcycled start of the run) and
the report sets the two side by side. Written to ``--out`` (default: ``routing/`` next to the
checkpoint): ``routing.json``, ``routing.md`` and ``routing.png``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os

import jax
import numpy as np

from sparse_upcycle import routing, sharding
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.config import ConfigError
from sparse_upcycle.data import make_pipeline
from sparse_upcycle.init_from import initial_params, open_init_source, place_as_is
from sparse_upcycle.moe import MoeMlp
from sparse_upcycle.task import moe_layer_names
from sparse_upcycle.training import build_training
from sparse_upcycle.upcycle.rules import ROUTER_RE

TOP_TOKENS = 8  # tokens listed per expert in routing.md / routing.json


@contextlib.contextmanager
def _recording():
    """Every ``MoeMlp`` call made inside appends ``{"lead": x.shape[:-1], "decision": …}``
    (the layer's routing decision, traced values when under ``jit``)."""
    calls: list[dict] = []
    call, route = MoeMlp.__call__, MoeMlp.route

    def recording_call(self, x, token_mask=None, **kwargs):
        calls.append({"lead": tuple(x.shape[:-1])})
        return call(self, x, token_mask, **kwargs)

    def recording_route(self, *args, **kwargs):
        decision = route(self, *args, **kwargs)
        calls[-1]["decision"] = decision
        return decision

    MoeMlp.__call__, MoeMlp.route = recording_call, recording_route  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        MoeMlp.__call__, MoeMlp.route = call, route  # type: ignore[method-assign]


def _routing_fn(loss_fn):
    """``(params, batch) -> ([per MoE layer: weights [*lead, E], router metrics], the batch's
    summed loss, correct and weight)``, jitted."""

    def run(params, batch):
        with _recording() as calls:
            _, metrics = loss_fn(params, batch, None, False)
        sums = {k: metrics[k] for k in ("loss_sum", "correct_sum", "weight_sum")}
        out = []
        for c in calls:
            w = routing.dense_combine_weights(c["decision"])
            t = math.prod(c["lead"])
            m = c["decision"].metrics
            out.append(
                {
                    "weights": w.reshape(-1, w.shape[-1])[:t].reshape(*c["lead"], -1),
                    "dropped_fraction": m.dropped_fraction,
                    "entropy": m.entropy,
                    "top1_prob": m.top1_prob,
                }
            )
        return out, sums

    return jax.jit(run)


def _load_params(config, path: str, t) -> dict:
    """The parameters of ``path`` for the model of ``t``: a checkpoint of this MoE is taken as
    it is; anything else (``init``: ``config.init_from``; a dense checkpoint; an ``upcycle``
    output) goes through ``train``'s initialisation, the recipe applied in memory."""
    cfg = copy.deepcopy(config)
    if path != "init":
        cfg.init_from = path
    source = open_init_source(cfg)
    if source is None:
        raise ConfigError("--start init needs config.init_from (the run's initial checkpoint)")
    target = {p: (tuple(a.shape), np.dtype(a.dtype)) for p, a in flatten(t.abstract_params).items()}
    if set(source.keys()) == set(target):  # a train checkpoint of this very model
        return place_as_is(source, target, flatten(t.param_sh))
    if any(ROUTER_RE.match(k) for k in source.keys()) and not source.is_upcycled:
        missing = sorted(set(target) - set(source.keys()))
        extra = sorted(set(source.keys()) - set(target))
        raise ConfigError(
            f"{path}: an MoE checkpoint that does not match the config's model (missing "
            f"{missing[:2]}, unexpected {extra[:2]}); inspect with the run's config"
        )
    params, _ = initial_params(cfg, t.spec, source, t.abstract_params, t.param_sh)
    return params


def _weight_stats(flat: dict, layer: str, start: dict | None) -> dict:
    """How far the layer's experts are apart and from where they started: ``expert_spread``
    = ||W - mean_E W|| / ||mean_E W|| (the mean repeated over the experts; 0 for copies),
    ``expert_drift`` = ||W - W_start|| /
    ||W_start|| against ``start`` (the first checkpoint inspected), both Frobenius norms over
    the stacked ``[E, …]`` expert kernels, averaged over the layer's kernels; and the RMS of
    the router kernel (the scale of its logits)."""
    mine = [k for k in flat if f"/{layer}/" in f"/{k}"]
    experts = [k for k in mine if "/expert/" in k and k.endswith("kernel")]
    router = [k for k in mine if k.endswith("router/w/kernel")]
    out: dict = {}
    if experts:
        spread = []
        for k in experts:
            mean = np.broadcast_to(flat[k].mean(0, keepdims=True), flat[k].shape)
            spread.append(np.linalg.norm(flat[k] - mean) / max(np.linalg.norm(mean), 1e-30))
        out["expert_spread"] = float(np.mean(spread))
        if start is not None:
            drift = [
                np.linalg.norm(flat[k] - start[k]) / max(np.linalg.norm(start[k]), 1e-30)
                for k in experts
            ]
            out["expert_drift"] = float(np.mean(drift))
    if router:
        out["router_kernel_rms"] = float(np.sqrt(np.mean(flat[router[0]] ** 2)))
    return out


def _token_key(family: str, layer: str) -> str | None:
    if family == "t5":
        return "encoder_input_tokens" if layer.startswith("encoder") else "decoder_input_tokens"
    if family == "decoder":
        return "tokens"
    return None


def _mutual_information(joint: np.ndarray) -> tuple[float, float, float]:
    """(I(X;E) bits, I / H(E), Miller's bias (X-1)(E-1)/(2N ln 2)) of a count matrix [X, E]."""
    n = joint.sum()
    if n == 0:
        return 0.0, 0.0, 0.0
    p = joint / n
    px, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / (px @ pe)[nz])).sum())
    he = float(-(pe[pe > 0] * np.log2(pe[pe > 0])).sum())
    rows, cols = int((joint.sum(1) > 0).sum()), int((joint.sum(0) > 0).sum())
    bias = (rows - 1) * (cols - 1) / (2 * n * math.log(2))
    return mi, (mi / he if he > 0 else 0.0), bias


def inspect_routing(
    config,
    path: str,
    *,
    start: str | None = None,
    batches: int | None = None,
    out: str | None = None,
) -> dict:
    """Inspect ``path`` (and ``start``) as the module docstring says; returns routing.json's
    content (with ``files``)."""
    if config.model.get("scan_layers", False):
        raise ConfigError("inspect --routing needs model.scan_layers=False (one call per layer)")
    batches = int(config.get("eval_steps", 4) if batches is None else batches)
    if batches < 1:
        raise ConfigError(f"--batches must be >= 1, got {batches}")
    cfg = copy.deepcopy(config)
    if path != "init":
        cfg.init_from = path
    source = open_init_source(cfg)
    try:
        mesh = sharding.mesh_from_config(config.get("mesh", {}))
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    t = build_training(cfg, source, mesh)
    names = moe_layer_names(t.spec)
    if not names:
        raise ConfigError("the config's model has no MoE layer (inspect --routing is for an MoE)")
    family = t.spec.family
    try:
        data = make_pipeline(config.data, family, t.spec.config, "validation")
        data_batches = [next(data) for _ in range(batches)]
    except (ValueError, StopIteration) as e:
        raise ConfigError(f"data: {e or 'too few validation batches'}") from None
    vocab = _vocabulary(config.data, t.spec.config)
    labels = {"start": start, "end": path} if start else {"end": path}
    fn = _routing_fn(t.loss_fn)
    report = {"family": family, "batches": batches, "layers": names, "checkpoints": {}}
    first = None
    for label, where in labels.items():
        params = _load_params(config, where, t)
        layers, validation = _inspect(fn, params, data_batches, names, family, vocab)
        flat = {k: np.asarray(v, np.float64) for k, v in flatten(jax.device_get(params)).items()}
        for name, row in layers.items():
            row.update(_weight_stats(flat, name, first))
        first = first if first is not None else flat
        report["checkpoints"][label] = {"path": where, "validation": validation, "layers": layers}
    if out is None:
        base = os.path.dirname(os.path.abspath(path)) if path != "init" else os.getcwd()
        out = os.path.join(base, "routing")
    os.makedirs(out, exist_ok=True)
    files = {k: os.path.join(out, f"routing.{k}") for k in ("json", "md", "png")}
    report["files"] = files
    _write(files["json"], json.dumps(report, indent=2, default=float))
    _write(files["md"], markdown(report))
    plot(report, files["png"])
    return report


def _vocabulary(data_config, model_config):
    """Token id -> piece for text data (the SentencePiece model of the corpus cache)."""
    if data_config.get("name") != "text":
        return None
    from sparse_upcycle.data import corpus

    entry = corpus.prepare_corpus(
        data_config.get("corpus_dir", None) or corpus.CORPUS_DIR,
        int(data_config.get("vocab_size", 8000)),
        data_config.get("cache_dir", None) or corpus.default_cache_dir(),
    )
    sp = corpus.load_vocab(entry)
    size = sp.get_piece_size()
    return lambda i: sp.id_to_piece(int(i)) if i < size else f"<extra {i}>"


def _inspect(fn, params, data_batches, names, family, vocab) -> tuple[dict, dict]:
    """Per MoE layer the routing statistics over ``data_batches``, and the model's validation
    loss and accuracy over the same batches (token- or example-weighted, as train's eval)."""
    layers: dict = {}
    totals = dict.fromkeys(("loss_sum", "correct_sum", "weight_sum"), 0.0)
    for batch in data_batches:
        outs, sums = jax.device_get(fn(params, batch))
        for k, v in sums.items():
            totals[k] += float(v)
        if len(outs) != len(names):
            raise ConfigError(
                f"the model ran {len(outs)} MoE layers, the config names {len(names)}"
            )
        for name, o in zip(names, outs, strict=True):
            w = np.asarray(o["weights"])
            assigned = w > 0  # [B, L, E] (or [T, E])
            e = w.shape[-1]
            acc = layers.setdefault(
                name, {"counts": np.zeros(e, np.int64), "dropped": [], "entropy": [], "top1": []}
            )
            acc["counts"] += assigned.reshape(-1, e).sum(0)
            acc["dropped"].append(float(o["dropped_fraction"]))
            acc["entropy"].append(float(o["entropy"]))
            acc["top1"].append(float(o["top1_prob"]))
            key = _token_key(family, name)
            if key is None:  # images: each patch counts for its image's label
                label = np.asarray(batch["label"]).reshape(-1)
                per_image = assigned.reshape(label.shape[0], -1, e).sum(1)
                classes = max(int(label.max()) + 1, acc.get("joint", np.zeros((0, e))).shape[0])
                joint = acc.get("joint", np.zeros((classes, e), np.int64))
                if joint.shape[0] < classes:
                    joint = np.pad(joint, ((0, classes - joint.shape[0]), (0, 0)))
                np.add.at(joint, label, per_image)
            else:
                tokens = np.asarray(batch[key]).reshape(-1)
                flat = assigned.reshape(-1, e)
                size = max(int(tokens.max()) + 1, acc.get("joint", np.zeros((0, e))).shape[0])
                joint = acc.get("joint", np.zeros((size, e), np.int64))
                if joint.shape[0] < size:
                    joint = np.pad(joint, ((0, size - joint.shape[0]), (0, 0)))
                np.add.at(joint, tokens, flat.astype(np.int64))
            acc["joint"] = joint
    out = {}
    for name, acc in layers.items():
        counts, joint = acc["counts"], acc["joint"]
        load = counts / max(counts.sum(), 1)
        mean = 1.0 / len(load)
        mi, ratio, bias = _mutual_information(joint)
        row = {
            "assignments": int(counts.sum()),
            "load": load.tolist(),
            "max_ratio": float(load.max() / mean),
            "min_ratio": float(load.min() / mean),
            "dropped_fraction": float(np.mean(acc["dropped"])),
            "entropy": float(np.mean(acc["entropy"])),
            "top1_prob": float(np.mean(acc["top1"])),
            "mutual_information_bits": mi,
            "mi_over_expert_entropy": ratio,
            "mi_bias_bits": bias,
        }
        if _token_key(family, name) is None:
            row["class_expert_counts"] = joint.tolist()
        else:
            vocab = vocab or str
            top = {}
            for e in range(joint.shape[1]):
                col = joint[:, e]
                total = max(int(col.sum()), 1)
                best = np.argsort(-col, kind="stable")[:TOP_TOKENS]
                top[str(e)] = [[vocab(i), int(col[i]), col[i] / total] for i in best if col[i]]
            row["top_tokens"] = top
        out[name] = row
    weight = max(totals["weight_sum"], 1.0)
    validation = {
        "loss": totals["loss_sum"] / weight,
        "accuracy": totals["correct_sum"] / weight,
    }
    return out, validation


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    labels = list(report["checkpoints"])
    lines = [
        "# Routing",
        "",
        f"{report['family']} model, {report['batches']} validation batches, evaluation router. "
        + ", ".join(f"{k}: `{v['path']}`" for k, v in report["checkpoints"].items())
        + ".",
        "",
        "| layer | checkpoint | load max/min (× mean) | dropped | router entropy (nats) | "
        "top-1 prob | I(x; expert) bits (/ H(expert)) | bias ≈ | router RMS | expert spread "
        "| drift from start |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in report["layers"]:
        for label in labels:
            r = report["checkpoints"][label]["layers"][name]
            lines.append(
                f"| {name} | {label} | {r['max_ratio']:.2f} / {r['min_ratio']:.2f} | "
                f"{r['dropped_fraction']:.4f} | {r['entropy']:.3f} | {r['top1_prob']:.3f} | "
                f"{r['mutual_information_bits']:.3f} ({r['mi_over_expert_entropy']:.3f}) | "
                f"{r['mi_bias_bits']:.3f} | {_cell(r, 'router_kernel_rms')} | "
                f"{_cell(r, 'expert_spread')} | {_cell(r, 'expert_drift')} |"
            )
    lines += ["", "Validation on the same batches (cross-entropy and accuracy, as train's eval):"]
    lines += [""]
    for label, c in report["checkpoints"].items():
        v = c["validation"]
        lines.append(f"- {label}: loss {v['loss']:.4f}, accuracy {v['accuracy']:.4f}")
    x = "class" if report["family"] == "vit" else "token"
    lines += ["", f"x is the {x} of the routed position.", ""]
    for label in labels:
        for name in report["layers"]:
            r = report["checkpoints"][label]["layers"][name]
            if "top_tokens" not in r:
                continue
            lines += [f"## {label}, {name}: most frequent tokens per expert", ""]
            lines += ["| expert | load | tokens (share of the expert's assignments) |"]
            lines += ["|---|---|---|"]
            for e, top in r["top_tokens"].items():
                shown = ", ".join(f"`{p!r}` {s:.2f}" for p, _, s in top)
                lines.append(f"| {e} | {r['load'][int(e)]:.3f} | {shown} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:.4f}" if key in row else "—"


def plot(report: dict, path: str) -> None:
    """Images: class × expert heatmaps (rows: checkpoints, columns: layers), each class's
    row normalised; text: each layer's expert load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, names = list(report["checkpoints"]), report["layers"]
    fig, axes = plt.subplots(
        len(labels), len(names), figsize=(3.6 * len(names), 3.0 * len(labels)), squeeze=False
    )
    for i, label in enumerate(labels):
        for j, name in enumerate(names):
            r, ax = report["checkpoints"][label]["layers"][name], axes[i][j]
            if "class_expert_counts" in r:
                m = np.asarray(r["class_expert_counts"], np.float64)
                m = m / np.maximum(m.sum(1, keepdims=True), 1)
                im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0)
                ax.set_xlabel("expert")
                ax.set_ylabel("class")
                fig.colorbar(im, ax=ax, fraction=0.046)
            else:
                load = np.asarray(r["load"])
                ax.bar(np.arange(len(load)), load)
                ax.axhline(1 / len(load), color="k", lw=0.8, ls="--")
                ax.set_xlabel("expert")
                ax.set_ylabel("share of assignments")
            ax.set_title(
                f"{label}: {name}\nI={r['mutual_information_bits']:.2f} bits, "
                f"H(router)={r['entropy']:.2f}",
                fontsize=8,
            )
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
