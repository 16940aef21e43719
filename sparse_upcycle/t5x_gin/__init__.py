"""T5X gin files as configs: ``--gin_file FILE`` (repeatable), ``--gin.NAME=value`` bindings and
``--gin_search_paths DIR[,DIR]``, for ``upcycle``, ``train`` and ``plan``.

``parser.py`` reads the files (gin-config's own parser, nothing of T5X imported);
``mapping.py`` turns their bindings into our config fields (the model and its MoE layers;
``training.py`` the loss, optimizer, schedule and run), refusing by name what this code base
cannot honour (``mapping.py``'s docstring has the table, binding by binding). Importing this
package stays cheap (the command line's parser needs ``add_arguments`` only).
"""

from __future__ import annotations

from collections.abc import Iterable


def add_arguments(parser) -> None:
    """``--gin_file`` and ``--gin_search_paths``; ``--gin.NAME=value`` come as extra args."""
    parser.add_argument(
        "--gin_file",
        action="append",
        default=[],
        metavar="FILE",
        help="a T5X gin file (repeatable, read in order; --gin.NAME=VALUE bindings after them)",
    )
    parser.add_argument(
        "--gin_search_paths",
        default="",
        metavar="DIR[,DIR]",
        help="directories where the gin files' includes are looked up",
    )


def uses_gin(args) -> bool:
    return bool(getattr(args, "gin_file", None) or getattr(args, "gin_bindings", None))


def gin_argv(args) -> list[str]:
    """The gin flags of ``args`` again, as a command line (``plan`` re-executes itself)."""
    out = [f"--gin_file={f}" for f in getattr(args, "gin_file", ())]
    if getattr(args, "gin_search_paths", ""):
        out.append(f"--gin_search_paths={args.gin_search_paths}")
    return [*out, *getattr(args, "gin_bindings", ())]


# ---------------------------------------------------------------------------------------------


def load(args, overrides: Iterable[str], command: str):
    """The run config of a command given ``--gin_file`` (and maybe ``--config``): the config
    file's (or the defaults'), then the gin values, then the ``--config.*`` overrides."""
    import ml_collections

    from sparse_upcycle.config import (
        ConfigError,
        apply_override,
        check,
        check_finite,
        load_config,
        run_schema,
    )
    from sparse_upcycle.defaults import default_config
    from sparse_upcycle.t5x_gin.mapping import to_overrides
    from sparse_upcycle.t5x_gin.parser import parse

    if not args.gin_file:
        raise ConfigError("--gin.NAME=value bindings need --gin_file")
    search = [p for p in args.gin_search_paths.split(",") if p]
    bindings = parse(args.gin_file, getattr(args, "gin_bindings", ()), search)
    mapped = to_overrides(bindings, command)
    known = run_schema()
    config = load_config(args.config, (), "run") if getattr(args, "config", None) else None
    config = config if config is not None else default_config()
    if command == "upcycle" and "upcycle" not in config:
        with config.unlocked():
            config.upcycle = ml_collections.ConfigDict({"method": "copy"})
    for field, value in mapped.overrides.items():
        if field.startswith("model.overrides.") and "overrides" not in config.model:
            with config.model.unlocked():
                config.model.overrides = ml_collections.ConfigDict()
        if field == "init_from" and command == "upcycle":
            continue  # upcycle's source: ``--src`` or this path (``source_from``)
        try:
            apply_override(config, f"config.{field}={value!r}", known)
        except ConfigError as e:
            raise ConfigError(f"gin: {field} = {value!r}: {e}") from None
    check(config, known, "config")
    for item in overrides:
        apply_override(config, item, known)
    check_finite(config, "config")
    return config, mapped


def source_path(mapped) -> str | None:
    """``upcycle``'s dense source from ``utils.RestoreCheckpointConfig.path``, if bound."""
    path = mapped.overrides.get("init_from")
    return str(path) if path else None
