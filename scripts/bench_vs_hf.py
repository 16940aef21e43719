"""Our MoE layer next to Hugging Face transformers' Mixtral sparse-MoE block, same shapes, one run.

Usage (needs the test extra: CPU torch and transformers; prints one JSON object):

    python scripts/bench_vs_hf.py [--tokens 4096] [--repeats 5] [--out bench_vs_hf.json]

Shapes (issue 17): E=8 experts, top-2, d=1024, f=3584 gated SiLU (SwiGLU), 4096 tokens, fp32,
forward + backward (gradients w.r.t. every parameter and the input, of ``sum(y * cot)``).
Both layers hold the same weights (ours are copied from the transformers block), and the JSON
records the largest output difference, so both compute one function: softmax over the router
logits, top-2, renormalised (Mixtral), which is our ``topk_then_softmax`` ordering.

Timed, interleaved round-robin, median of ``--repeats`` (each timed call right after an
untimed one):

* ``ours_s``: ``MoeMlp`` with ``dispatch="auto"`` (recorded as ``dispatch``), dropless, jitted.
* ``onehot_s``: the same layer with the one-hot einsum reference (``dispatch="onehot"``).
* ``hf_<impl>_s``: ``MixtralSparseMoeBlock`` in torch with the experts implementations
  transformers offers for training here: ``eager`` (the default loop over experts) and
  ``grouped_mm`` where this torch build supports it (skipped with the reason otherwise).
  ``batched_mm`` is left out: it gathers each assignment's expert weights, [T·K, 2f, d]
  (15 GB at 256 tokens in fp32), and was killed for memory on a 24 GB machine.

* ``expert_matmul_s``: only our expert MLPs on pre-gathered, perfectly balanced [E, T·K/E, d]
  buffers: the arithmetic floor every implementation of this layer has to pay.

``ours_over_hf_<impl> = ours_s / hf_<impl>_s`` (goal <= 0.5 against the default);
``<name>_over_floor = <name>_s / expert_matmul_s``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import emit
from flax import nnx

from sparse_upcycle import host_memory, moe, routing

E, K, D, F = 8, 2, 1024, 3584
HF_IMPLS = ("eager", "grouped_mm")


def _hf_block(impl: str, tokens: int):
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=D,
        intermediate_size=F,
        num_local_experts=E,
        num_experts_per_tok=K,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = impl
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block.train()
    return block


def _hf_step(block, x, cot):
    def step():
        block.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        y = block(xi)
        (y * cot).sum().backward()
        return xi.grad

    return step


def _copy_into_ours(block, layer: moe.MoeMlp) -> None:
    gate_up = block.experts.gate_up_proj.detach().numpy()  # [E, 2f, d]
    down = block.experts.down_proj.detach().numpy()  # [E, d, f]
    layer.router.w.kernel[...] = jnp.asarray(block.gate.weight.detach().numpy().T)
    kernels = {  # t5x naming: wi_0 (gate), wi_1 (up), wo (down)
        "wi_0": gate_up[:, :F].transpose(0, 2, 1),
        "wi_1": gate_up[:, F:].transpose(0, 2, 1),
        "wo": down.transpose(0, 2, 1),
    }
    for name, value in kernels.items():
        getattr(layer.expert, name).kernel[...] = jnp.asarray(value)


def _our_layer(tokens: int, dispatch: str) -> moe.MoeMlp:
    router = routing.TopKRouter(E, k=K, capacity_factor=None, ordering="topk_then_softmax")
    return moe.MoeMlp(
        D,
        F,
        router,
        activations=("silu", "linear"),
        group_size=tokens,
        dispatch=dispatch,
        rngs=nnx.Rngs(0),
    )


def _our_step(layer: moe.MoeMlp, x, cot):
    graphdef, state = nnx.split(layer)

    @jax.jit
    def grads(state, x):
        def loss(state, x):
            y, _ = nnx.merge(graphdef, state)(x)
            return jnp.sum(y * cot)

        return jax.grad(loss, argnums=(0, 1))(state, x)

    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
    return (lambda: jax.block_until_ready(grads(state, x))), (lambda: forward(state, x))


def main() -> None:
    # glibc settings as the command line applies them (SPARSE_UPCYCLE_MALLOC=system: defaults)
    malloc = "tuned" if host_memory.tune() else "system"
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be >= 1")
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(1, args.tokens, D)).astype(np.float32)
    cot_np = rng.normal(size=(1, args.tokens, D)).astype(np.float32)
    x_t, cot_t = torch.from_numpy(x_np), torch.from_numpy(cot_np)

    fns, diffs, skipped = {}, {}, {}
    reference = None
    for impl in HF_IMPLS:
        block = _hf_block(impl, args.tokens)
        try:
            with torch.no_grad():
                y = block(x_t).numpy()
        except Exception as e:  # an implementation this torch build lacks on this device
            skipped[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        if reference is None:
            reference, ref_block = y, block
        diffs[f"hf_{impl}"] = float(np.abs(y - reference).max())
        fns[f"hf_{impl}_s"] = _hf_step(block, x_t, cot_t)
    if reference is None:
        raise SystemExit("no transformers experts implementation ran here")
    x, cot = jnp.asarray(x_np), jnp.asarray(cot_np)
    for key, dispatch in (("ours_s", "auto"), ("onehot_s", "onehot")):
        layer = _our_layer(args.tokens, dispatch)
        _copy_into_ours(ref_block, layer)
        step, forward = _our_step(layer, x, cot)
        diffs[key.removesuffix("_s")] = float(np.abs(np.asarray(forward()) - reference).max())
        fns[key] = step

    floor_layer = _our_layer(args.tokens, "auto")
    graphdef, state = nnx.split(floor_layer.expert)
    buf = jnp.asarray(rng.normal(size=(E, args.tokens * K // E, D)).astype(np.float32))

    @jax.jit
    def floor(state, buf):
        return jax.grad(lambda st, b: jnp.sum(nnx.merge(graphdef, st)(b[None])), argnums=(0, 1))(
            state, buf
        )

    fns["expert_matmul_s"] = lambda: jax.block_until_ready(floor(state, buf))

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            fn()  # compiles (jax) or warms the allocator (torch) in the first round
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    result = {
        "config": {"E": E, "k": K, "d": D, "f": F, "mlp": "swiglu", "tokens": args.tokens},
        "dtype": "float32",
        "timing": "median fwd+bwd, interleaved",
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "malloc": malloc,
        },
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "transformers": transformers.__version__,
        "dispatch": moe.resolve_dispatch("auto"),
        "max_abs_diff_vs_hf_eager": diffs,
        "hf_skipped": skipped,
    }
    for name, t in times.items():
        result[name] = statistics.median(t)
        result[name.removesuffix("_s") + "_spread"] = (max(t) - min(t)) / statistics.median(t)
    for name in fns:
        if name.startswith("hf_"):
            result["ours_over_" + name.removesuffix("_s")] = result["ours_s"] / result[name]
    result["onehot_over_ours"] = result["onehot_s"] / result["ours_s"]
    for name in fns:
        if name != "expert_matmul_s":
            over = result[name] / result["expert_matmul_s"]
            result[name.removesuffix("_s") + "_over_floor"] = over
    emit(result, args.out)


if __name__ == "__main__":
    main()
