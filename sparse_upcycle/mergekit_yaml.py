"""mergekit-moe's YAML configs, read as they are (``sparse-upcycle upcycle --mergekit-yaml``).

A mergekit-moe config (mergekit ``moe/config.py``: ``MoEMergeConfig`` / ``Expert``) becomes an
experiment config: the decoder of the base model's ``config.json`` (``model.name =
"checkpoint"``) with every MLP an MoE layer of Mixtral's routing, and an ``upcycle`` recipe with
one source per distinct model. Field by field:

=====================================  ====================================================
mergekit                               ours
=====================================  ====================================================
``base_model: PATH``                   ``upcycle.sources[0]``, ``base_source = 0``,
                                       ``non_expert = "base"`` (attention, norms,
                                       embeddings and the output head from the base)
``experts[i].source_model: PATH``      ``upcycle.sources`` (each distinct path once) and
                                       ``upcycle.expert_sources[i]``: expert i is a copy of
                                       that model's MLP (``method = "copy"``)
``experts[i].positive_prompts``        ``upcycle.positive_prompts[i]``
``experts[i].negative_prompts``        ``upcycle.negative_prompts[i]``
``gate_mode: hidden`` (the default)    ``router_init = "hidden_last"`` (mergekit's ``hidden``
                                       takes each prompt's last position)
``gate_mode: hidden_avg``              ``router_init = "hidden"`` (mean over positions)
``gate_mode: hidden_last``             ``router_init = "hidden_last"``
``gate_mode: cheap_embed``             ``router_init = "cheap_embed"``
``gate_mode: random``                  ``router_init = "random"``, ``router_init_std = 1``
                                       (``torch.randn``)
``gate_mode: uniform_random``          ``router_init = "uniform_random"``
``experts_per_token: K`` (default 2)   ``model.moe.k = K``, ``upcycle.k = K``
``dtype``                              the ``export --dtype`` the command prints next (our
                                       upcycled checkpoint is float32, the training
                                       precision)
``architecture: mixtral`` (or unset)   accepted; ``export`` writes Mixtral for a Llama /
                                       Mistral base and Qwen2-MoE / Qwen3-MoE for a Qwen one
``architecture: qwen`` + one           Qwen2-MoE from Qwen2 models: ``model.moe``
``shared_experts`` entry               ``shared_expert_gate = True`` and
                                       ``upcycle.shared_source``: one shared expert per layer,
                                       a copy of that entry's ``source_model`` MLP (full
                                       width), its gate vector made as one more router row
                                       (its prompts last in ``positive_prompts``)
``architecture: qwen`` / ``qwen3``     accepted for a Qwen3 base (Qwen3-MoE)
without ``shared_experts``
``shared_experts`` with architecture   refused: mergekit picks its DeepSeek output there;
unset or mixtral, or from a Llama /    Qwen2-MoE from Llama sources would need q/k/v biases
Mistral base; DeepSeek; ``noise_scale``,  added
``residual_scale``                     refused, by name
=====================================  ====================================================

Routing: Mixtral's (softmax over the experts, top-K, the K weights renormalised:
``topk_then_softmax``), dropless, load-balancing loss weight 0.001 (HF Mixtral's
``router_aux_loss_coef``). Any ``--config.<field>=<value>`` override applies on top.
"""

from __future__ import annotations

import os

import ml_collections

from sparse_upcycle.config import ConfigError
from sparse_upcycle.defaults import default_config

TOP_FIELDS = (
    "base_model",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "experts",
    "shared_experts",
    "architecture",
)
EXPERT_FIELDS = (
    "source_model",
    "positive_prompts",
    "negative_prompts",
    "noise_scale",
    "residual_scale",
)
GATE_MODES = {
    "hidden": "hidden_last",
    "hidden_avg": "hidden",
    "hidden_last": "hidden_last",
    "cheap_embed": "cheap_embed",
    "random": "random",
    "uniform_random": "uniform_random",
}
DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURES = (None, "mixtral", "qwen", "qwen3")


def read(path: str) -> dict:
    """The YAML mapping at ``path`` (ConfigError naming the file when it is not one)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a mergekit-moe config is a YAML mapping")
    return data


def _strings(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ConfigError(f"{where} must be a list of strings")
    return tuple(value)


def _path(value, where: str, base_dir: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a model directory path, got {value!r}")
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base_dir, value))


def config_from_yaml(path: str) -> tuple[ml_collections.ConfigDict, str | None]:
    """(the experiment config of the mergekit-moe config at ``path``, its ``dtype`` or None).
    Relative model paths are taken from the YAML file's directory."""
    data = read(path)
    where = os.path.basename(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    unknown = sorted(set(data) - set(TOP_FIELDS))
    if unknown:
        raise ConfigError(
            f"{where}: mergekit field {unknown[0]!r} is not supported (known: {TOP_FIELDS})"
        )
    arch = data.get("architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{where}: architecture {arch!r} is not supported; use one of "
            f"{tuple(a for a in ARCHITECTURES if a)} or leave it unset"
        )
    if "base_model" not in data:
        raise ConfigError(f"{where}: base_model is required")
    base = _path(data["base_model"], f"{where}: base_model", base_dir)
    gate = data.get("gate_mode", "hidden")
    if gate not in GATE_MODES:
        raise ConfigError(f"{where}: gate_mode {gate!r} is not one of {tuple(GATE_MODES)}")
    shared = _shared_expert(data, where, arch, _model_type(base, where), gate)
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{where}: dtype {dtype!r} is not one of {DTYPES}")
    k = data.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{where}: experts_per_token must be an integer >= 1, got {k!r}")
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise ConfigError(f"{where}: experts must be a non-empty list")
    if len(experts) < k:
        raise ConfigError(
            f"{where}: {len(experts)} expert(s) for experts_per_token={k}; need at least {k}"
        )
    sources, assignment, positive, negative = [base], [], [], []
    for i, e in enumerate([*experts, *shared]):
        at = f"{where}: experts[{i}]" if i < len(experts) else f"{where}: shared_experts[0]"
        if not isinstance(e, dict):
            raise ConfigError(f"{at} must be a mapping with source_model")
        bad = sorted(set(e) - set(EXPERT_FIELDS))
        if bad:
            raise ConfigError(f"{at}: field {bad[0]!r} is not supported (known: {EXPERT_FIELDS})")
        for name, neutral in (("noise_scale", 0.0), ("residual_scale", 1.0)):
            if e.get(name) not in (None, neutral):
                raise ConfigError(f"{at}: {name} is not supported; remove it")
        if "source_model" not in e:
            raise ConfigError(f"{at}: source_model is required")
        src = _path(e["source_model"], f"{at}.source_model", base_dir)
        if src not in sources:
            sources.append(src)
        if i < len(experts):
            assignment.append(sources.index(src))
        positive.append(_strings(e.get("positive_prompts"), f"{at}.positive_prompts"))
        negative.append(_strings(e.get("negative_prompts"), f"{at}.negative_prompts"))
    prompted = GATE_MODES[gate] not in ("random", "uniform_random")
    if prompted:
        empty = [i for i, p in enumerate(positive) if not p]
        if empty:
            which = f"experts[{empty[0]}]" if empty[0] < len(experts) else "shared_experts[0]"
            raise ConfigError(
                f"{where}: {which} has no positive_prompts, which gate_mode={gate} needs"
            )
    c = default_config()
    c.model = ml_collections.ConfigDict(
        {
            "family": "decoder",
            "name": "checkpoint",
            "overrides": {"dtype": "float32"},
            "moe": {
                "layers": "all",
                "router": "top_k",
                "k": k,
                "ordering": "topk_then_softmax",
                "renormalize": False,
                "capacity_factor": None,
                "eval_capacity_factor": None,
                "group_size": 4096,
                "router_init_std": 0.02,
                "aux_loss_weight": 0.001,
                "router_z_loss_weight": 0.0,
                **({"shared_expert_gate": True} if shared else {}),
            },
        }
    )
    c.upcycle = ml_collections.ConfigDict(
        {
            "method": "copy",
            "num_experts": len(experts),
            "k": k,
            "ordering": "topk_then_softmax",
            "sources": sources,
            "expert_sources": assignment,
            "base_source": 0,
            "non_expert": "base",
            "router_init": GATE_MODES[gate],
            "router_init_std": 1.0 if gate == "random" else 0.02,
            "positive_prompts": [list(p) for p in positive] if prompted else [],
            "negative_prompts": ([list(n) for n in negative] if prompted and any(negative) else []),
            "shared_source": sources.index(_path(shared[0]["source_model"], "", base_dir))
            if shared
            else -1,
        }
    )
    return c, dtype


def _model_type(base: str, where: str) -> str | None:
    """The ``model_type`` of the base model's ``config.json`` (None when it has none: the
    surgeon then says what the base is)."""
    import json

    try:
        with open(os.path.join(base, "config.json"), encoding="utf-8") as f:
            value = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _shared_expert(data: dict, where: str, arch, model_type, gate: str) -> list[dict]:
    """``shared_experts`` checked against the output mergekit would choose: [] or the one
    shared expert of its Qwen MoE output (``moe/qwen.py``: exactly one, from Qwen2 models
    here, with prompts unless ``gate_mode: random``)."""
    shared = data.get("shared_experts")
    if shared is None:
        shared = []
    if not isinstance(shared, list):
        raise ConfigError(f"{where}: shared_experts must be a list")
    if not shared:
        if arch in ("qwen", "qwen3") and model_type != "qwen3":
            raise ConfigError(
                f"{where}: architecture {arch} without shared_experts is mergekit's Qwen3 MoE, "
                f"for Qwen3 models (the base is {model_type!r}); use mixtral"
            )
        return []
    if arch not in ("qwen",):
        why = (
            "mergekit would choose its DeepSeek MoE output here"
            if arch is None
            else f"{arch} has no shared expert"
        )
        raise ConfigError(
            f"{where}: shared_experts: {why}; set architecture: qwen (Qwen2-MoE, one shared expert)"
        )
    if len(shared) != 1:
        raise ConfigError(
            f"{where}: shared_experts has {len(shared)} entries; the Qwen MoE output takes "
            "exactly one"
        )
    if model_type != "qwen2":
        raise ConfigError(
            f"{where}: shared_experts into Qwen2-MoE from a {model_type!r} base is not "
            "supported (Llama/Mistral sources would need q/k/v biases added); use Qwen2 "
            "models, or architecture: mixtral without shared_experts"
        )
    entry = shared[0]
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: shared_experts[0] must be a mapping with source_model")
    if gate != "random" and not entry.get("positive_prompts"):
        raise ConfigError(
            f"{where}: shared_experts[0] has no positive_prompts, which gate_mode={gate} "
            "needs (its gate is made like a router row)"
        )
    return [entry]
