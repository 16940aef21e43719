"""``sparse-upcycle inspect``: its arguments and its dispatch. Without ``--routing`` the
checkpoint report of ``verify.inspect``; with ``--routing --config C`` the routing inspector of
``inspect_routing.py``. This module imports no jax, so ``--help`` stays cheap."""

from __future__ import annotations

import argparse

from sparse_upcycle.checkpoints import FORMATS


def add_arguments(ins: argparse.ArgumentParser) -> None:
    ins.add_argument(
        "path",
        help="any checkpoint this tool reads, or an upcycle output; with --routing also 'init' "
        "(the run's initial parameters: init_from with the config's recipe, as train builds them)",
    )
    ins.add_argument("--format", default="auto", choices=FORMATS)
    ins.add_argument("--routing", action="store_true", help="inspect the routers (needs --config)")
    ins.add_argument(
        "--config", help="the run's config: PATH.py[:arg], or the config.json a compare run holds"
    )
    ins.add_argument(
        "--start", help="a second checkpoint shown beside PATH, e.g. 'init' (the upcycled start)"
    )
    ins.add_argument("--batches", type=int, help="validation batches (default: eval_steps)")
    ins.add_argument("--out", help="output directory (default: routing/ beside PATH)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print the checkpoint report, or run the routing inspector and print its ``.md`` path.
    Routing-only flags without ``--routing`` are a config error (exit 2)."""
    from sparse_upcycle.config import ConfigError, check_command, load_config

    if not args.routing:
        from sparse_upcycle import verify

        if args.config or args.start or args.batches or args.out:
            raise ConfigError("--config, --start, --batches and --out go with --routing")
        print(verify.inspect(args.path, args.format))
        return 0
    from sparse_upcycle.inspect_routing import inspect_routing

    if not args.config:
        raise ConfigError("inspect --routing needs --config (the run's config)")
    config = load_config(args.config, overrides)
    check_command(config, "train")
    report = inspect_routing(
        config, args.path, start=args.start, batches=args.batches, out=args.out
    )
    print(report["files"]["md"])
    return 0
