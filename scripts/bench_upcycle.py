"""Benchmark the surgeon on a T5-small-size v1.1 checkpoint (prints one JSON object).

    python scripts/bench_upcycle.py [--workdir /tmp/bench_upcycle] [--experts 32]

A dense T5 v1.1 small (d=512, f=1024, 8+8 layers, vocab 32128) is written as an Orbax
checkpoint with random weights, then upcycled with ``copy`` to 32 experts in every other layer
(~1.6 GB fp32 out) through ``surgeon.upcycle``. In the same run, the same number of bytes is
written raw (one file, fsync) to measure the disk. Reports seconds, output bytes, write MB/s,
raw disk MB/s, their ratio (goal >= 0.5) and the peak RSS of this process (goal <= 1 GB;
``ru_maxrss``, which includes the Python/JAX runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _raw_disk_mb_s(path: str, nbytes: int) -> float:
    block = np.random.default_rng(0).bytes(64 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(block[: min(len(block), nbytes - written)])
            written += min(len(block), nbytes - written)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    os.remove(path)
    return nbytes / seconds / 1e6


def _write_dense(dense_dir: str) -> None:
    from sparse_upcycle.checkpoints.orbax import StreamingWriter
    from sparse_upcycle.checkpoints.tree import flatten
    from sparse_upcycle.models import t5

    rng = np.random.default_rng(0)
    writer = StreamingWriter(dense_dir)
    for key, s in flatten(t5.abstract_params(t5.config("small"))).items():
        writer.add(key, rng.standard_normal(s.shape, np.float32) * 0.02)
    writer.close(step=1000)


def _upcycle(dense_dir: str, out: str, experts: int) -> None:
    from sparse_upcycle import surgeon

    config = ml_collections.ConfigDict(
        {
            "model": {
                "family": "t5",
                "name": "small",
                "overrides": {},
                "encoder_moe": {"router": "expert_choice", "capacity_factor": 2.0},
                "decoder_moe": {"router": "top_k", "k": 2},
            },
            "upcycle": {"method": "copy", "num_experts": experts},
        }
    )
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    surgeon.upcycle(config, dense_dir, out, progress=False)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "baseline_rss_mb": baseline,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_upcycle")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument(
        "--phase", choices=["all", "dense", "upcycle"], default="all", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    dense_dir, out = os.path.join(args.workdir, "dense"), os.path.join(args.workdir, "moe")
    if args.phase == "dense":
        return _write_dense(dense_dir)
    if args.phase == "upcycle":
        return _upcycle(dense_dir, out, args.experts)

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    me = [
        sys.executable,
        os.path.abspath(__file__),
        "--workdir",
        args.workdir,
        "--experts",
        str(args.experts),
        "--phase",
    ]
    subprocess.run([*me, "dense"], check=True)
    # A fresh process, so that its peak RSS is the surgeon's (plus the Python/JAX runtime).
    run = subprocess.run([*me, "upcycle"], check=True, capture_output=True, text=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    nbytes = _dir_bytes(out)
    raw = _raw_disk_mb_s(os.path.join(args.workdir, "raw.bin"), nbytes)
    report = {
        "case": f"t5 v1.1 small -> {args.experts} experts, every other layer, copy",
        "seconds": measured["seconds"],
        "output_bytes": nbytes,
        "write_mb_s": nbytes / measured["seconds"] / 1e6,
        "raw_disk_mb_s": raw,
        "ratio_vs_raw_disk": nbytes / measured["seconds"] / 1e6 / raw,
        "peak_rss_mb": measured["peak_rss_mb"],
        "runtime_rss_mb_before_upcycle": measured["baseline_rss_mb"],
    }
    print(json.dumps(report, indent=2))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
