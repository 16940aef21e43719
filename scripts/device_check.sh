#!/usr/bin/env bash
# The accelerator check (issue 17): on a GPU (or TPU) host with jax for that platform installed,
# run from the repository root:
#
#     bash scripts/device_check.sh [OUT_DIR]
#
# Prints one JSON object (also written to OUT_DIR/device_check.json, default $OUT or /tmp) with:
#   * bench_moe in bfloat16: the paper's expert choice E=32 C=2 and Llama-3-8B's MLP as 8 experts
#     top-2 dropless, each against bare expert matmuls (ratio) and as achieved TFLOP/s;
#   * bench_train: a T5-base-size (12+12 layers, d=768) upcycled train step next to the dense one
#     in bfloat16, MFU against the device's bf16 data-sheet peak.
# Budget: under 5 minutes on one H100/H200-class GPU (compiles included).
#
# SMOKE=1 runs the same steps at toy sizes (256 tokens, the E=32 dropless case in place of Llama,
# a 2+2-layer T5-small) so that the script itself can be checked on a CPU in ~3 minutes.
#
# Packages the host lacks (ml_collections, grain, tensorboardX on some images) can be put as
# wheels in .whl/ (see the device tool's README); they are installed to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false

# bf16 dense peak (TFLOP/s) by device kind, from the vendors' data sheets (without sparsity).
peak=$("$py" - <<'EOF'
import jax
kind = jax.devices()[0].device_kind
table = {"H200": 989, "H100": 989, "A100": 312, "L4": 121, "TPU v4": 275, "TPU v5p": 459,
         "TPU v5 lite": 197, "TPU v6": 918}
print(next((v for k, v in table.items() if k in kind), 0))
EOF
)
tokens=8192 llama=llama_8x_top2 train=(--size base --layers 12 --batch 64 --repeats 5)
if [ "${SMOKE:-0}" = 1 ]; then
  tokens=256 llama=top2_dropless train=(--size small --layers 2 --batch 2 --repeats 1)
fi
start=$SECONDS
timeout 150 "$py" scripts/bench_moe.py --dtype bfloat16 --tokens "$tokens" --repeats 5 \
  --cases expert_choice_C2 --out "$out/bench_moe_ec.json" > /dev/null
timeout 120 "$py" scripts/bench_moe.py --dtype bfloat16 --tokens "$tokens" --repeats 5 \
  --cases "$llama" --no-onehot --out "$out/bench_moe_llama.json" > /dev/null
peak_flag=()
if [ "$peak" != 0 ]; then peak_flag=(--peak-tflops "$peak"); fi
timeout 150 "$py" scripts/bench_train.py "${train[@]}" --dtype bfloat16 \
  "${peak_flag[@]}" --out "$out/bench_train.json" > /dev/null
"$py" - "$out" "$peak" "$((SECONDS - start))" <<'EOF'
import json, sys
out, peak, seconds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
read = lambda name: json.load(open(f"{out}/{name}"))
moe = [c for f in ("bench_moe_ec.json", "bench_moe_llama.json") for c in read(f)["cases"]]
train = read("bench_train.json")
summary = {
    "device": read("bench_moe_ec.json")["machine"]["devices"],
    "bf16_peak_tflops": peak or None,
    "seconds": seconds,
    "moe": [
        {k: c.get(k) for k in ("case", "dispatch", "moe_s", "expert_matmul_s", "ratio_vs_matmul",
                               "speedup_vs_onehot", "other_dispatch", "other_ratio_vs_matmul")}
        | {"achieved_tflops": c["achieved_gflops"] / 1e3,
           "fraction_of_peak": c["achieved_gflops"] / 1e3 / peak if peak else None}
        for c in moe
    ],
    "train": {
        name: {k: train[name][k] for k in ("step_s", "achieved_tflops", "mfu")}
        for name in ("dense", "upcycled")
    } | {"time_ratio_over_flops_ratio": train["time_ratio_over_flops_ratio"]},
}
text = json.dumps(summary, indent=2)
print(text)
open(f"{out}/device_check.json", "w").write(text + "\n")
EOF
