"""The ``sparse-upcycle`` command line.

Expected bad input (missing or corrupt checkpoints, wrong shapes, impossible settings) prints
one line ``sparse-upcycle: error: …`` and exits 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

from sparse_upcycle import __version__, t5x_gin
from sparse_upcycle.checkpoints import FORMATS

DESCRIPTION = (
    "Sparse upcycling: turn a trained dense Transformer (T5, ViT, Llama-style decoder) into a "
    "sparse Mixture-of-Experts model and train it further."
)


class _Parser(argparse.ArgumentParser):
    """Usage errors as the one line every other refusal is: ``sparse-upcycle: error: …``.
    Flags must be spelled out: a prefix (``--overwrit``) is an unknown flag, not a guess."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"sparse-upcycle: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _tolerance(text: str) -> float:
    """``--tol``: a finite number >= 0 (``nan`` would make every comparison false)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _hf_output_arguments(p, when: str, dtype_default, dtype_default_help: str) -> None:
    """The options of a Hugging Face output (``export``; ``upcycle --output-format hf``)."""
    p.add_argument(
        "--moe-layout",
        default="fused",
        choices=("fused", "per_expert"),
        help=f"{when}MoE expert tensors: transformers 5.x fused (default) or 4.x per-expert",
    )
    p.add_argument(
        "--dtype",
        default=dtype_default,
        choices=("auto", "float32", "bfloat16", "float16"),
        help=f"{when}tensor dtype (default: {dtype_default_help})",
    )
    p.add_argument("--max-shard-size", default="5GB", help=f"{when}e.g. 5GB, 500MB (default 5GB)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparse-upcycle", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser(
        "upcycle",
        help="dense checkpoint -> MoE checkpoint (offline surgery)",
        description="Upcycle a dense checkpoint into an MoE checkpoint. Extra "
        "--config.<field>=<value> arguments override the config.",
    )
    up.add_argument("--config", help="CONFIG.py[:arg] with get_config(arg)")
    up.add_argument(
        "--mergekit-yaml",
        metavar="FILE",
        help="a mergekit-moe config (base_model, experts, gate_mode, ...) instead of --config "
        "and --src (sparse_upcycle/mergekit_yaml.py has the field mapping)",
    )
    up.add_argument(
        "--src",
        help="dense checkpoint (T5X, Orbax, .npz, HF dir); several sources go in the config's "
        "upcycle.sources instead",
    )
    up.add_argument(
        "--dst", required=True, help="output directory (Orbax + recipe.json, or an HF directory)"
    )
    t5x_gin.add_arguments(up)
    up.add_argument("--format", default="auto", choices=FORMATS, help="source format")
    up.add_argument(
        "--output-format",
        default="orbax",
        choices=("orbax", "hf"),
        help="orbax: our layout, for train/verify/export (default); hf: the Hugging Face MoE "
        "directory export --format hf would write, in one pass (decoders)",
    )
    _hf_output_arguments(
        up,
        "with --output-format hf: ",
        None,
        "the mergekit YAML's dtype, else auto: the HF source's",
    )
    up.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    up.add_argument(
        "--refuse-non-finite",
        action="store_true",
        help="stop (exit 2, nothing written) at the first source tensor holding NaN/inf "
        "instead of copying it with a warning",
    )

    ver = sub.add_parser(
        "verify",
        help="compare dense and upcycled logits on one batch",
        description="Run the dense and the MoE model on the same deterministic "
        "batch; exit 1 if the recipe is meant to preserve the dense function "
        "and the logits differ by more than the tolerance.",
    )
    ver.add_argument("--config", required=True, help="CONFIG.py[:arg] used for upcycle")
    ver.add_argument("--dense", required=True, help="the dense checkpoint")
    ver.add_argument("--moe", required=True, help="the directory written by upcycle")
    ver.add_argument("--format", default="auto", choices=FORMATS, help="dense format")
    ver.add_argument(
        "--tol",
        type=_tolerance,
        default=1e-4,
        help="max |Δlogits| allowed, relative to max(1, max |dense logit|)",
    )

    tr = sub.add_parser(
        "train",
        help="train or resume a dense, upcycled or from-scratch MoE model",
        description="Train with a config (get_config(arg)); a --workdir that holds "
        "checkpoints resumes from the latest. Extra --config.<field>=<value> arguments "
        "override the config.",
    )
    tr.add_argument("--config", help="CONFIG.py[:arg] with get_config(arg)")
    tr.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/")
    t5x_gin.add_arguments(tr)

    cmp_ = sub.add_parser(
        "compare",
        help="dense continued vs upcycled vs MoE from scratch at equal extra compute",
        description="Pre-train (or reuse) a dense model, then train every arm of the config "
        "for the same extra training FLOPs over several seeds; writes report.md, report.json "
        "and report.png to --workdir. Rerunning resumes: finished runs are not recomputed.",
    )
    cmp_.add_argument("--config", required=True, help="configs/compare_*.py[:arg]")
    cmp_.add_argument("--workdir", required=True, help="runs and the report")

    exp = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model (or HF -> our Orbax layout)",
        description="Export an upcycle/train output to a Hugging Face directory (config.json + "
        "safetensors): an MoE decoder as MixtralForCausalLM, dense T5/ViT/Llama as their HF "
        "classes; or (--format orbax) write any readable checkpoint in our layout. A model "
        "the HF class would compute differently is refused.",
    )
    exp.add_argument("--src", required=True, help="upcycle output, HF dir, or checkpoint")
    exp.add_argument("--dst", required=True, help="output directory")
    exp.add_argument("--format", default="hf", choices=("hf", "orbax"), help="output format")
    exp.add_argument("--src-format", default="auto", choices=FORMATS, help="source format")
    exp.add_argument(
        "--config",
        help="CONFIG.py[:arg] describing the model, for a source without one (a train "
        "checkpoint step directory, T5X, .npz)",
    )
    _hf_output_arguments(exp, "", "auto", "auto: the HF source's, else float32")
    exp.add_argument(
        "--dropless",
        action="store_true",
        help="export an MoE whose evaluation capacity can drop tokens as dropless Mixtral",
    )
    exp.add_argument(
        "--hf-source",
        help="HF directory (or upcycle output) whose config.json, tokenizer and generation "
        "files go with the export, when --src does not carry them (a train step directory)",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --dst")

    from sparse_upcycle import inspect_cmd, plan  # import no jax: the parser stays cheap
    from sparse_upcycle.data import text_to_shards

    ins = sub.add_parser(
        "inspect",
        help="format, tensors, parameter counts, recipe, capacity; --routing: what the routers "
        "do on validation data",
        description="Without --routing: a report of the checkpoint's format, tensors, parameter "
        "counts, recipe and capacities. With --routing --config C: the MoE of C runs on "
        "validation batches and, per MoE layer, the expert load, dropped fraction, router "
        "entropy and what each expert takes (class x expert for images, the most frequent "
        "tokens for text) are written to --out (routing.json, .md, .png); "
        "--config.<field>=<value> arguments override C.",
    )
    inspect_cmd.add_arguments(ins)

    pl = sub.add_parser(
        "plan",
        help="per-device memory, FLOPs and collectives of a config's train step "
        "(compiled for N fake CPU devices, nothing allocated)",
        description="Compile the real train step of a config for --devices fake CPU devices "
        "and report per-device parameter, optimizer-state and XLA memory, model FLOPs, HLO "
        "collectives and compile time against --hbm. Extra --config.<field>=<value> "
        "arguments override the config. Exit 0 if it fits, 1 if not.",
    )
    plan.add_arguments(pl)
    tok = sub.add_parser(
        "tokenize",
        help="text files -> token shards (data.name=token_shards) with a tokenizer.json",
        description="Tokenise a directory of .txt / .jsonl(.gz) files with a Hugging Face "
        "tokenizer.json into memory-mapped .npy shards and a manifest.json.",
    )
    text_to_shards.add_arguments(tok)
    return parser


def _run(args, overrides) -> int:
    from sparse_upcycle import surgeon, verify
    from sparse_upcycle.config import ConfigError, load_config

    if args.command == "inspect":
        from sparse_upcycle import inspect_cmd

        return inspect_cmd.run(args, overrides)
    if args.command == "plan":
        from sparse_upcycle import plan

        return plan.run(args, overrides)
    if args.command == "tokenize":
        from sparse_upcycle.data import text_to_shards

        return text_to_shards.run(args)
    if args.command == "export":
        from sparse_upcycle.export import export

        config = load_config(args.config, overrides) if args.config else None
        if config is not None:
            from sparse_upcycle.config import check_command

            check_command(config, "export")
        info = export(
            args.src,
            args.dst,
            args.format,
            src_format=args.src_format,
            config=config,
            moe_layout=args.moe_layout,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            dropless=args.dropless,
            hf_source=args.hf_source,
            overwrite=args.overwrite,
            progress=sys.stderr.isatty(),
        )
        detail = (
            f"{info['architecture']}, {info['dtype']}, {len(info['files'])} safetensors file(s)"
            if args.format == "hf"
            else f"{info['family']}, {info['tensors']} tensors"
        )
        print(f"wrote {args.dst}: {detail} from {args.src}")
        return 0
    from sparse_upcycle.config import check_command

    schema = "compare" if args.command == "compare" else "run"
    mergekit_dtype = None
    if t5x_gin.uses_gin(args):
        from sparse_upcycle.config import ConfigError

        if getattr(args, "mergekit_yaml", None):
            raise ConfigError("upcycle: --mergekit-yaml and --gin_file do not go together")
        config, mapped = t5x_gin.load(args, overrides, args.command)
        if args.command == "upcycle" and not args.src and not config.upcycle.get("sources"):
            args.src = t5x_gin.source_path(mapped)
        _gin_summary(args, mapped)
    elif args.command == "upcycle" and (args.mergekit_yaml or not args.config):
        config, mergekit_dtype = _mergekit_config(args, overrides)
    elif not args.config:
        from sparse_upcycle.config import ConfigError

        raise ConfigError(f"{args.command}: pass --config (or --gin_file)")
    else:
        config = load_config(args.config, overrides, schema)
    check_command(config, args.command)
    if args.command in ("train", "compare"):
        import logging

        logger = logging.getLogger("sparse_upcycle")
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        from sparse_upcycle import compile_cache

        compile_cache.enable()  # runs of the same shapes (seeds, arms, resumes) compile once
    if args.command == "train":
        from sparse_upcycle.train import dump_json, train_and_evaluate
        from sparse_upcycle.training import check_resume

        check_resume(config, args.workdir)

        result = train_and_evaluate(config, args.workdir)
        print(dump_json(result))
        return 0
    if args.command == "compare":
        from sparse_upcycle.compare import run_compare

        report = run_compare(config, args.workdir)
        print(report["markdown"])
        print(f"plot: {report['files']['png']}")
        return 0
    if args.command == "upcycle":
        from sparse_upcycle.config import ConfigError
        from sparse_upcycle.upcycle.verdict import Verdict

        hf = None
        if args.output_format == "hf":
            hf = surgeon.HFOutput(
                dtype=args.dtype or mergekit_dtype or "auto",
                moe_layout=args.moe_layout,
                max_shard_size=args.max_shard_size,
            )
        else:
            given = [f"--{n}" for n in ("dtype",) if getattr(args, n) is not None] + [
                f"--{n.replace('_', '-')}"
                for n, default in (("moe_layout", "fused"), ("max_shard_size", "5GB"))
                if getattr(args, n) != default
            ]
            if given:
                raise ConfigError(f"upcycle: {given[0]} goes with --output-format hf")
        info = surgeon.upcycle(
            config,
            args.src,
            args.dst,
            args.format,
            args.overwrite,
            progress=sys.stderr.isatty(),
            refuse_non_finite=args.refuse_non_finite,
            hf=hf,
        )
        verdict = Verdict(info["preserves_dense_function"], tuple(info["preservation"]))
        print(
            f"wrote {args.dst}: {info['recipe_name']} ({info['family']}, "
            f"{info['recipe']['method']}) from {_sources_line(info)}; "
            f"meant to preserve the dense function: {verdict}"
        )
        if hf is not None:
            out = info["hf"]
            print(
                f"{args.dst}: {out['architecture']} ({out['dtype']}, "
                f"{len(out['files'])} file(s), {out['bytes'] / 1e9:.2f} GB); "
                f"recipe in {surgeon.HF_RECIPE_FILE}"
            )
        elif args.mergekit_yaml:  # mergekit writes an HF MoE: this is the step that does
            dtype = f" --dtype {mergekit_dtype}" if mergekit_dtype else ""
            print(f"next: sparse-upcycle export --src {args.dst} --dst HF_DIR{dtype}")
        return 0
    result = verify.verify(config, args.dense, args.moe, args.format, args.tol)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def _gin_summary(args, mapped) -> None:
    """One stderr line on what the gin files gave (and notes on what was read differently)."""
    print(
        f"sparse-upcycle: gin: {len(args.gin_file)} file(s), {len(mapped.overrides)} config "
        f"fields set, {mapped.ignored} plumbing binding(s) not used",
        file=sys.stderr,
    )
    for note in mapped.notes:
        print(f"sparse-upcycle: gin: {note}", file=sys.stderr)


def _mergekit_config(args, overrides):
    """The experiment config of ``upcycle --mergekit-yaml`` (with the overrides applied)."""
    from sparse_upcycle.config import ConfigError, apply_override, run_schema
    from sparse_upcycle.mergekit_yaml import config_from_yaml

    if not args.mergekit_yaml:
        raise ConfigError("upcycle: pass --config (with --src) or --mergekit-yaml")
    if args.config or args.src:
        raise ConfigError(
            "upcycle --mergekit-yaml names the models itself: drop --config and --src"
        )
    config, dtype = config_from_yaml(args.mergekit_yaml)
    known = run_schema()
    for item in overrides:
        apply_override(config, item, known)
    return config, dtype


def _sources_line(info: dict) -> str:
    """``FORMAT PATH`` of the dense source, or of every source of a multi-source recipe."""
    listed = info.get("sources") or [info["source"]]
    return ", ".join(f"{s['format']} {s['path']}" for s in listed)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"sparse-upcycle: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    from sparse_upcycle import async_noise, host_memory

    host_memory.tune()  # before jax starts its threads: see host_memory.py
    warnings.formatwarning = _one_line_warning
    async_noise.quiet()  # Orbax/TensorStore's leftovers after a failed read or write
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    overrides = [a for a in extra if a.startswith("--config.")]
    args.gin_bindings = [a for a in extra if a.startswith("--gin.")]
    unknown = [a for a in extra if not a.startswith(("--config.", "--gin."))]
    if args.gin_bindings and args.command not in ("upcycle", "train", "plan"):
        unknown += args.gin_bindings
    if unknown or (
        overrides
        and (
            args.command == "tokenize"
            or (args.command == "inspect" and not args.routing)
            or (args.command == "export" and not args.config)
        )
    ):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    from sparse_upcycle.checkpoints.errors import CheckpointError
    from sparse_upcycle.config import ConfigError

    training_errors: tuple[type[Exception], ...] = ()  # `except ()` catches nothing
    if args.command in ("train", "compare"):
        from sparse_upcycle.train import TrainingError

        training_errors = (TrainingError,)
    from sparse_upcycle.compare import Preempted

    try:
        return _run(args, overrides)
    except Preempted as e:
        print(f"sparse-upcycle: {e}", file=sys.stderr)
        return 0
    except training_errors as e:
        print(f"sparse-upcycle: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"sparse-upcycle: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        print(
            f"sparse-upcycle: error: out of memory ({e or 'MemoryError'}); check the sizes the "
            "config asks for (num_experts, batch_size, seq_len), or run on a larger machine",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:  # stdout closed early (`sparse-upcycle inspect … | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # e.g. a full disk while writing: the partial output was removed
        print(
            f"sparse-upcycle: error: {e.strerror or e} ({e.filename or 'I/O'}); nothing was "
            "written",
            file=sys.stderr,
        )
        return 2


def entry() -> None:
    """The ``sparse-upcycle`` executable: ``main``, then exit. After a failure (exit code not 0)
    the process ends at once (``os._exit``, streams flushed) instead of through interpreter
    shutdown: Orbax/TensorStore leave asyncio tasks and callbacks behind a failed write or
    read, and their garbage collection at shutdown would print tracebacks ("Event loop is
    closed", "Task exception was never retrieved") after the one error line. The outputs of a
    failed command are already removed by then; a success exits normally."""
    import os

    code = main()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
