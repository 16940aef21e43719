"""Our config from the bindings of T5X gin files (``parser.Bindings``).

What is read (T5X's binding names, their value into our config):

==================================================  ==========================================
T5X / flaxformer binding                            ours
==================================================  ==========================================
``network.T5Config.<field>`` (t5x/examples/t5)      ``model.overrides.<field>`` (the same
                                                    names; T5X's dataclass defaults for fields
                                                    not bound, e.g. ``relu``, dropout 0.1)
flaxformer MoE architecture (``moe.gin``):          ``model.overrides``: ``vocab_size``,
``embedding.Embed.num_embeddings / features``,      ``emb_dim``, ``num_heads``, ``head_dim``,
``dense_attention.MultiHeadDotProductAttention.``   ``mlp_dim``, ``mlp_activations``,
``num_heads / head_dim``, ``dense.MlpBlock.``       ``num_encoder_layers``,
``intermediate_dim / activations``,                 ``num_decoder_layers``, ``dtype``,
``moe_architecture.Sparse{En,De}coder.num_layers``, ``dropout_rate``,
``t5_architecture.EncoderDecoder.dtype``,           ``relative_attention_num_buckets /
``dropout_factory/linen.Dropout.rate``,             max_distance``, ``logits_via_embedding``
``relative_position_biases.RelativePositionBiases.  (``output_logits_factory = None``)
num_buckets / max_distance``
``moe_architecture.Sparse{En,De}coder.              ``model.{encoder,decoder}_moe.layers``:
num_sparse_layers / sparse_layout``                 flaxformer's ``_is_sparse_layer`` (MIXED:
                                                    every (L/S)-th block, the last of each
                                                    run; BOTTOM, TOP, MIDDLE)
``{sparse_encoder,sparse_decoder}/moe_layers.       ``num_experts``, ``group_size``,
MoeLayer.num_experts / max_group_size``             ``group_multiple = num_experts`` (the
                                                    ``_num_groups`` rule without the data
                                                    replicas, which depend on the devices)
``… .router = @routing.ExpertsChooseMaskedRouter``  ``router = "expert_choice"``, C as is,
                                                    combine weights not normalised
``… .router = @routing.TokensChoose{Masked,         ``router = "top_k"``, ``k =
Scatter}Router``, ``num_selected_experts``          num_selected_experts``,
                                                    ``softmax_then_topk``, not renormalised
``… .train_capacity_factor / eval_…``               expert choice: C; top-K: C / K (T5X's
                                                    ``round(C·S/E)`` slots for every router,
                                                    ours ``ceil(c·S·K/E)``)
``… .batch_prioritized_routing``, ``jitter_noise``  ``batch_prioritized``, ``jitter_eps``
``expert/dense.MlpBlock.intermediate_dim``          ``expert_mlp_dim`` when it differs
``router_init/linen.initializers.normal.stddev``    ``router_init_std`` (and the recipe's)
``models.{Moe,}EncoderDecoderModel.z_loss /         ``loss.z_loss``, ``loss.label_smoothing``,
label_smoothing / aux_loss_factor /                 ``aux_loss_weight``,
router_z_loss_factor``                              ``router_z_loss_weight``
``adafactor.Adafactor.decay_rate / beta1 /          ``optimizer.decay_rate``, ``momentum``,
clipping_threshold / multiply_by_parameter_scale /  ``clipping_threshold``,
factored / min_dim_size_to_factor /                 ``multiply_by_parameter_scale``,
weight_decay_rate / global_norm_clip_threshold``    ``factored``, ``min_dim_size_to_factor``,
                                                    ``weight_decay``, ``clip_grad_norm``
``utils.create_learning_rate_scheduler.factors``    ``'constant * rsqrt_decay'`` → ``rsqrt``,
``/ base_learning_rate / warmup_steps``             ``'constant'`` → ``constant`` (no warm-up);
                                                    ``learning_rate``, ``warmup_steps``
``train_script.train.total_steps / eval_steps /     ``total_steps`` (minus the restored step:
eval_period``, ``utils.SaveCheckpointConfig.        T5X counts from the checkpoint's),
period / keep``                                     ``eval_steps``, ``eval_every``,
                                                    ``checkpoint.every / keep``
``train/utils.DatasetConfig.batch_size /            ``data.batch_size``, ``data.seq_len``,
task_feature_lengths``                              ``data.target_len``
``utils.RestoreCheckpointConfig.path`` (a           ``init_from`` (``train``) or the ``--src``
``checkpoint_<step>`` directory)                    of ``upcycle``; ``optimizer.step_offset``
                                                    = its step − the schedule's ``step_offset``
``… .checkpointer_cls = @checkpoints.               an ``upcycle`` recipe: ``copy``,
UpcycleCheckpointer``, ``checkpoints.               ``num_experts``, optimizer state reset
UpcycleCheckpointer.num_experts``, its              when ``state/param_states`` is dropped
``assignment_map``                                  (T5X ``sparse_upcycle.gin``), else tiled
``moe_partitioning.MoePjitPartitioner.              ``mesh.expert``, ``mesh.model``
num_expert_partitions / num_partitions``,
``partitioning.PjitPartitioner.num_partitions``
==================================================  ==========================================

Bindings that only wire or initialise flaxformer modules (initialisers, factories, axis names,
sub-module dtypes, partitioning hints), seqio vocabularies and tasks, dataset and checkpoint
plumbing are read and not used (``upcycle``/``train`` print how many). A binding of the model,
router, loss, optimizer or schedule that this code base cannot honour — another activation,
attention with biases, a ``min_expert_capacity`` other than 0 or T5X's 4 (ours has none), a
learning-rate factor string other than the two above, micro-batching, an unknown field — is
refused by name with its file and line (exit 2), as is a ``%gin.REQUIRED`` that is still
unbound. ``--config FILE`` may be given too: the gin values apply on top of it, then the
``--config.*`` overrides.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from sparse_upcycle.config import ConfigError
from sparse_upcycle.t5x_gin import training
from sparse_upcycle.t5x_gin.parser import _MISSING, Bindings, Macro, Ref, _name
from sparse_upcycle.t5x_gin.training import check as _check

# ---------------------------------------------------------------------------------------------

T5X_T5CONFIG_DEFAULTS = {  # t5x/examples/t5/network.py T5Config (vocab_size has none)
    "dtype": "float32",
    "emb_dim": 512,
    "num_heads": 8,
    "num_encoder_layers": 6,
    "num_decoder_layers": 6,
    "head_dim": 64,
    "mlp_dim": 2048,
    "mlp_activations": ("relu",),
    "dropout_rate": 0.1,
    "logits_via_embedding": False,
}
_T5CONFIG_FIELDS = (*T5X_T5CONFIG_DEFAULTS, "vocab_size")
_ATTENTION_DROPOUT = (
    "dropout > 0: applied as models/t5.py does (not on the attention probabilities, as T5X also "
    "does)"
)
_FALSE_ONLY = {"float32_attention_logits"}  # T5Config fields we accept only at their default
TOKENS_CHOOSE = ("routing.TokensChooseMaskedRouter", "routing.TokensChooseScatterRouter")
EXPERTS_CHOOSE = ("routing.ExpertsChooseMaskedRouter",)
STACKS = {"encoder": ("moe_architecture.SparseEncoder", "sparse_encoder"),
          "decoder": ("moe_architecture.SparseDecoder", "sparse_decoder")}  # fmt: skip

# Read and not used: plumbing, initialisers (only a model from scratch would use them) and
# flaxformer's module wiring, whose meaningful values are read through the names above.
_IGNORED_SELECTORS = re.compile(
    r"^(seqio\.|partitioning\.(?!PjitPartitioner)|utils\.(DatasetConfig|CheckpointConfig|"
    r"SaveCheckpointConfig|RestoreCheckpointConfig)$|gin_utils\.|linen\.initializers\.|"
    r"layer_norm\.|t5_architecture\.(EncoderLayer|DecoderLayer)$|"
    r"moe_architecture\.Sparse(Encoder|Decoder)Layer$|evaluation\.|infer_script\.|"
    r"eval_script\.|seqio|t5\.data)"
)
_IGNORED_ARGS = re.compile(
    r"(_init|_factory|axis_names?|_axes|partitioning_dims|_partitions|sharding_constraints|"
    r"^dtype|_dtype|^name|^scanned|^one_hot|^broadcast_\w+|^kernel_axis_names|^precision|"
    r"^router_weights|^expert|^mlp|^attention|^self_attention|^encoder_decoder_attention|"
    r"^split_params|^model_parallel_submesh|^logical_\w+|^layer_remat|^scan_layers|"
    r"^dropout_rate|^input_dropout_factory|^features|^num_embeddings|^num_heads|^head_dim|"
    r"^intermediate_dim|^activations|^intermediate_dropout_rate|^final_dropout_rate|"
    r"^use_bias|^num_buckets|^max_distance|^bias_init|^epsilon)$"
)
_IGNORED_TRAIN_ARGS = {
    "model", "model_dir", "train_dataset_cfg", "train_eval_dataset_cfg", "infer_eval_dataset_cfg",
    "checkpoint_cfg", "partitioner", "trainer_cls", "summarize_config_fn",
    "inference_evaluator_cls",
    "get_dataset_fn", "concurrent_metrics", "actions", "train_eval_get_dataset_fn",
    "run_eval_before_training", "train_state_initializer_cls", "use_orbax", "stats_period",
    "gc_period", "use_jax_array", "verify_matching_vocabs_fn", "use_gda", "random_seed",
    "hardware_rng", "use_hardware_rng", "export_checkpoint_fn", "skip_first_batch",
}  # fmt: skip
_MODEL_IGNORED = {
    "module", "input_vocabulary", "output_vocabulary", "optimizer_def", "decode_fn",
    "feature_converter_cls", "loss_normalizing_factor",
}  # fmt: skip


class Mapped(NamedTuple):
    overrides: dict[str, Any]  # dotted config field -> value
    notes: list[str]  # what was read differently or not used, for the user
    ignored: int  # bindings read and not used


def to_overrides(b: Bindings, command: str) -> Mapped:
    """Our config fields from T5X bindings (ConfigError naming any binding we cannot honour)."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    if any(sel == "network.T5Config" for _, sel, _ in b.values):
        _dense_t5x(b, out, notes)
    elif b.has("moe_architecture.SparseEncoder", "num_layers") or b.has(
        "moe_architecture.SparseDecoder", "num_layers"
    ):
        _flaxformer_moe(b, out, notes)
    else:
        raise ConfigError(
            "gin: no T5 architecture in the gin files (network.T5Config.* of t5x/examples/t5, "
            "or flaxformer's moe_architecture.SparseEncoder / SparseDecoder)"
        )
    training.loss(b, out)
    training.optimizer(b, out, notes)
    training.run(b, out, notes, command)
    _refuse_unread(b)
    ignored = len(b.values) - len(b.read)
    return Mapped(out, notes, ignored)


def _dense_t5x(b: Bindings, out: dict, notes: list[str]) -> None:
    sel = "network.T5Config"
    for scope, selector, arg in list(b.values):
        if selector == sel and arg not in _T5CONFIG_FIELDS and arg not in _FALSE_ONLY:
            raise ConfigError(
                f"gin: cannot honour {_name(scope, selector, arg)} "
                f"({b.where((scope, selector, arg))}): not a T5Config field this model has"
            )
    _check(b, sel, "float32_attention_logits", lambda v: not v, "not implemented")
    out["model.family"] = "t5"
    out["model.name"] = "base"
    for field in _T5CONFIG_FIELDS:
        value = b.get(sel, field, default=T5X_T5CONFIG_DEFAULTS.get(field, _MISSING))
        out[f"model.overrides.{field}"] = _plain(field, value)
    if out["model.overrides.dropout_rate"]:
        notes.append(_ATTENTION_DROPOUT)
    if b.has("network.Transformer", "config"):
        b.get("network.Transformer", "config")
    for stack in ("encoder", "decoder"):  # dense: no MoE blocks
        out[f"model.{stack}_moe.num_experts"] = 0


def _plain(field: str, value):
    if field == "mlp_activations":
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if field == "dtype":
        return str(getattr(value, "name", value)).removeprefix("jnp.")
    return value


def sparse_layers(num_layers: int, num_sparse: int, layout: str, where: str) -> tuple[int, ...]:
    """The sparse blocks of flaxformer's layouts (``moe_architecture._is_sparse_layer``)."""
    if layout == "mixed" and num_sparse > 0 and num_layers % num_sparse:
        raise ConfigError(
            f"gin: {where}: the MIXED layout needs num_sparse_layers ({num_sparse}) to divide "
            f"num_layers ({num_layers})"
        )
    rules = {
        "bottom": lambda i: i < num_sparse,
        "middle": lambda i: num_layers - num_sparse <= 2 * i < num_layers + num_sparse,
        "mixed": lambda i: (
            num_sparse > 0 and i % (num_layers // num_sparse) == (num_layers // num_sparse - 1)
        ),
        "top": lambda i: i >= num_layers - num_sparse,
    }
    if layout not in rules:
        raise ConfigError(f"gin: {where}: unknown sparse layout {layout!r}")
    return tuple(i for i in range(num_layers) if rules[layout](i))


def _flaxformer_moe(b: Bindings, out: dict, notes: list[str]) -> None:
    attn = "dense_attention.MultiHeadDotProductAttention"
    mlp = "dense.MlpBlock"
    out["model.family"] = "t5"
    out["model.name"] = "base"
    o = "model.overrides."
    out[o + "vocab_size"] = b.get("embedding.Embed", "num_embeddings")
    out[o + "emb_dim"] = b.get("embedding.Embed", "features")
    out[o + "num_heads"] = b.get(attn, "num_heads")
    out[o + "head_dim"] = b.get(attn, "head_dim")
    out[o + "mlp_dim"] = b.get(mlp, "intermediate_dim")
    activations = _plain("mlp_activations", b.get(mlp, "activations", default=("relu",)))
    out[o + "mlp_activations"] = activations
    out[o + "dtype"] = _plain(
        "dtype", b.get("t5_architecture.EncoderDecoder", "dtype", "", "float32")
    )
    rate = b.get("linen.Dropout", "rate", "dropout_factory", 0.0)
    out[o + "dropout_rate"] = rate
    if rate:
        notes.append(_ATTENTION_DROPOUT)
    rel = "relative_position_biases.RelativePositionBiases"
    out[o + "relative_attention_num_buckets"] = b.get(rel, "num_buckets", default=32)
    out[o + "relative_attention_max_distance"] = b.get(rel, "max_distance", default=128)
    if b.has("layer_norm.T5LayerNorm", "epsilon"):
        out[o + "layer_norm_eps"] = b.get("layer_norm.T5LayerNorm", "epsilon")
    for selector in (attn, mlp, "output_logits/dense.DenseGeneral", "routing.RouterWeights"):
        scope, _, name = selector.rpartition("/")
        _check(b, name, "use_bias", lambda v: not v, "this model has no biases", scope)
    _check(b, mlp, "final_dropout_rate", lambda v: not v, "not implemented")
    _check(b, mlp, "intermediate_dropout_rate", lambda v: v in (0, rate), "one dropout rate")
    _check(b, "dense.MlpBlock", "intermediate_dropout_rate", lambda v: v in (0, rate),
           "one dropout rate", "expert")  # fmt: skip
    if b.has(attn, "dropout_rate"):
        b.get(attn, "dropout_rate")  # attention-probability dropout: _ATTENTION_DROPOUT
    decoder = "moe_architecture.SparseDecoder"
    if b.has(decoder, "output_logits_factory"):
        out[o + "logits_via_embedding"] = b.get(decoder, "output_logits_factory") is None
    active: set[tuple[str, str]] = set()  # (scope, router class) of the sparse stacks
    for stack, (arch, scope) in STACKS.items():
        num_layers = b.get(arch, "num_layers")
        out[o + f"num_{stack}_layers"] = num_layers
        num_sparse = b.get(arch, "num_sparse_layers", default=0)
        layout = str(b.get(arch, "sparse_layout", default="mixed")).lower()
        layers = sparse_layers(num_layers, num_sparse, layout, f"{arch}.sparse_layout")
        m = f"model.{stack}_moe."
        if not layers:
            out[m + "num_experts"] = 0
            continue
        active.add(_moe_stack(b, out, notes, m, scope, layers, num_layers, activations))
    _mark_unused_routers(b, active)


def _mark_unused_routers(b: Bindings, active: set[tuple[str, str]]) -> None:
    """Bindings of router classes (and MoE layers) that no sparse stack uses: wiring of the
    other choice (moe.gin configures both routers' scopes whatever the model picks)."""
    routers = (*TOKENS_CHOOSE, *EXPERTS_CHOOSE)
    for key in b.values:
        scope, selector, _ = key
        if key in b.read or selector not in (*routers, "moe_layers.MoeLayer"):
            continue
        used = any(
            (sel == selector or selector == "moe_layers.MoeLayer")
            and (not scope or s == scope or s.startswith(scope + "/"))
            for s, sel in active
        )
        if not used:
            b.read.add(key)


def _layers_spec(layers: tuple[int, ...], num_layers: int) -> str | tuple[int, ...]:
    """Our ``moe.layers`` name for the set when it has one (``every_other``: 1, 3, 5, …)."""
    if layers == tuple(range(1, num_layers, 2)):
        return "every_other"
    if layers == tuple(range(num_layers)):
        return "all"
    return layers


def _moe_stack(b, out, notes, m, scope, layers, num_layers, activations) -> tuple[str, str]:
    layer = "moe_layers.MoeLayer"
    num_experts = b.get(layer, "num_experts", scope)
    out[m + "num_experts"] = num_experts
    out[m + "layers"] = _layers_spec(tuple(layers), num_layers)
    group = b.get(layer, "max_group_size", scope)
    out[m + "group_size"] = group
    out[m + "group_multiple"] = num_experts
    _check(b, layer, "strict_group_size", lambda v: not v, "not implemented", scope)
    _check(
        b, layer, "min_expert_capacity", lambda v: v in (0, 4),
        "ours has no minimum capacity (T5X's default 4 only matters below 4 slots)", scope,
    )  # fmt: skip
    router = b.get(layer, "router", scope)
    if not isinstance(router, Ref) or router.selector not in (*TOKENS_CHOOSE, *EXPERTS_CHOOSE):
        key = b.key(layer, "router", scope)
        where = b.where(key) if key else "?"
        raise ConfigError(f"gin: cannot honour router {router!r} ({where}): unknown router class")
    rscope = router.scope or scope
    train_c = b.get(layer, "train_capacity_factor", scope)
    eval_c = b.get(layer, "eval_capacity_factor", scope)
    jitter = b.get(router.selector, "jitter_noise", rscope, 0.0)
    out[m + "jitter_eps"] = jitter
    _check(
        b, router.selector, "ignore_padding_tokens", lambda v: not v,
        "padding is always routed here (it is masked from the loss)", rscope,
    )  # fmt: skip
    if router.selector in EXPERTS_CHOOSE:
        out[m + "router"] = "expert_choice"
        out[m + "capacity_factor"] = train_c
        out[m + "eval_capacity_factor"] = eval_c
        out[m + "normalize_combine_weights"] = False
    else:
        k = b.get(router.selector, "num_selected_experts", rscope)
        out[m + "router"] = "top_k"
        out[m + "k"] = k
        out[m + "capacity_factor"] = train_c / k
        out[m + "eval_capacity_factor"] = eval_c / k
        out[m + "ordering"] = "softmax_then_topk"
        out[m + "renormalize"] = False
        bpr = b.get(router.selector, "batch_prioritized_routing", rscope, False)
        out[m + "batch_prioritized"] = bool(bpr)
    expert_dim = b.get("dense.MlpBlock", "intermediate_dim", f"{scope}/expert", None)
    if expert_dim is None:
        expert_dim = b.get("dense.MlpBlock", "intermediate_dim", "expert", None)
    if expert_dim is not None and expert_dim != out["model.overrides.mlp_dim"]:
        out[m + "expert_mlp_dim"] = expert_dim
    expert_act = b.get("dense.MlpBlock", "activations", "expert", activations)
    if _plain("mlp_activations", expert_act) != activations:
        raise ConfigError(
            f"gin: cannot honour expert/dense.MlpBlock.activations = {expert_act!r}: the experts "
            "use the dense MLP's activations here"
        )
    std = b.get("linen.initializers.normal", "stddev", "router_init", None)
    if std is not None:
        out[m + "router_init_std"] = std
        out["upcycle.router_init_std"] = std
    return rscope, router.selector


def _refuse_unread(b: Bindings) -> None:
    """Every binding not read above is plumbing we ignore, or one we cannot honour."""
    for key in sorted(b.values):
        if key in b.read:
            continue
        scope, selector, arg = key
        full = f"{scope}/{selector}" if scope else selector
        if _IGNORED_SELECTORS.search(selector) or _IGNORED_SELECTORS.search(full):
            continue
        if selector == "train_script.train" and arg in _IGNORED_TRAIN_ARGS:
            continue
        if selector.startswith("models.") and (
            arg in _MODEL_IGNORED or arg.startswith("predict_batch")
        ):
            continue
        if selector.startswith("models.") and "." in arg:  # e.g. predict_batch_with_aux.*
            continue
        if _IGNORED_ARGS.search(arg) and _is_flaxformer(selector):
            continue
        if selector in (
            "trainer.Trainer",
            "moe_trainer.MoeTrainer",
            "checkpoints.UpcycleCheckpointer",
        ):
            continue
        if selector.startswith(("partitioning.", "moe_partitioning.")):
            if arg in ("logical_axis_rules", "num_partitions", "num_expert_partitions",
                       "use_cpu_pjit", "backend", "params_on_devices"):  # fmt: skip
                continue
        value = b.values[key][0]
        raise ConfigError(
            f"gin: cannot honour {_name(*key)} = {_show(value)} ({b.where(key)}): not a "
            "setting this code base maps (see sparse_upcycle/t5x_gin.py)"
        )


_FLAXFORMER_MODULES = (
    "dense_attention.", "dense.", "embedding.", "relative_position_biases.", "t5_architecture.",
    "moe_architecture.", "moe_layers.", "routing.", "layer_norm.", "linen.",
)  # fmt: skip


def _is_flaxformer(selector: str) -> bool:
    return selector.startswith(_FLAXFORMER_MODULES)


def _show(value) -> str:
    if isinstance(value, Macro):
        return f"%{value.name}"
    if isinstance(value, Ref):
        return f"@{value.name}{'()' if value.call else ''}"
    return repr(value)
