"""Reading T5X gin files into their bindings (``Bindings``); ``mapping.py`` makes our config
of them.

The files are parsed with the ``gin-config`` package's own parser (``gin.config_parser``, which
imports nothing of T5X, flaxformer or TensorFlow) and evaluated here: statements in order,
``include`` files inline where they stand, the last binding of a name wins, macros are late-bound
(``%NUM_EXPERTS`` takes the macro's final value wherever it is used), and a binding applies in
its scope and below (``sparse_encoder/moe_layers.MoeLayer.router`` inside
``@sparse_encoder/moe_layers.MoeLayer()``). ``import`` lines are read and ignored: nothing is
imported, so a T5X file needs neither t5x nor flaxformer installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from sparse_upcycle.config import ConfigError

# ---------------------------------------------------------------------------------------------


class Macro(NamedTuple):
    """``%NAME`` in a value."""

    name: str


class Ref(NamedTuple):
    """``@scope/module.Name()`` (``call``) or ``@module.Name`` in a value."""

    name: str
    call: bool

    @property
    def scope(self) -> str:
        return self.name.rpartition("/")[0]

    @property
    def selector(self) -> str:
        return self.name.rpartition("/")[2]


class _Required:
    def __repr__(self) -> str:
        return "%gin.REQUIRED"


REQUIRED = _Required()
_MISSING = object()
MAX_INCLUDE_DEPTH = 32


class Bindings:
    """Every binding and macro of a set of gin files, in gin's last-one-wins order."""

    def __init__(self):
        self.values: dict[tuple[str, str, str], tuple[Any, str]] = {}  # (scope, sel, arg)
        self.macros: dict[str, tuple[Any, str]] = {}
        self.read: set[tuple[str, str, str]] = set()
        self.files: list[str] = []

    def bind(self, scope: str, selector: str, arg: str, value, where: str) -> None:
        if not arg:  # ``NAME = value``: a macro
            self.macros[selector if not scope else f"{scope}/{selector}"] = (value, where)
        else:
            self.values[scope, selector, arg] = (value, where)

    def where(self, key: tuple[str, str, str]) -> str:
        return self.values[key][1]

    def key(self, selector: str, arg: str, scope: str = "") -> tuple[str, str, str] | None:
        """The binding that applies to ``selector.arg`` called in ``scope``: the innermost
        scope that binds it, else the unscoped one."""
        parts = scope.split("/") if scope else []
        for n in range(len(parts), -1, -1):
            key = ("/".join(parts[:n]), selector, arg)
            if key in self.values:
                return key
        return None

    def get(self, selector: str, arg: str, scope: str = "", default: Any = _MISSING) -> Any:
        """The evaluated value of ``selector.arg`` in ``scope`` (``default`` when unbound)."""
        key = self.key(selector, arg, scope)
        if key is None:
            if default is _MISSING:
                raise ConfigError(f"gin: {_name(scope, selector, arg)} is not bound")
            return default
        self.read.add(key)
        value = self.evaluate(self.values[key][0], self.values[key][1])
        if value is REQUIRED:
            raise ConfigError(
                f"gin: {_name(*key)} is %gin.REQUIRED ({self.values[key][1]}): bind it, e.g. "
                f"with --gin.{_required_macro(self.values[key][0], self) or _name(*key)}=VALUE"
            )
        return value

    def has(self, selector: str, arg: str, scope: str = "") -> bool:
        return self.key(selector, arg, scope) is not None

    def evaluate(self, value, where: str, seen: tuple[str, ...] = ()) -> Any:
        """``value`` with every ``%MACRO`` replaced by the macro's final value."""
        if isinstance(value, Macro):
            name = value.name
            if name == "gin.REQUIRED":
                return REQUIRED
            if name in seen:
                raise ConfigError(f"gin: macro {name} refers to itself ({where})")
            if name in self.macros:
                inner, inner_where = self.macros[name]
                return self.evaluate(inner, inner_where, (*seen, name))
            enum = re.fullmatch(r"(?:\w+\.)*LayerLayout\.(\w+)", name)
            if enum:  # flaxformer moe_enums.LayerLayout constants are their lower-case names
                return enum.group(1).lower()
            raise ConfigError(f"gin: %{name} is not defined ({where})")
        if isinstance(value, Ref):
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(self.evaluate(v, where, seen) for v in value)
        if isinstance(value, dict):
            return {k: self.evaluate(v, where, seen) for k, v in value.items()}
        return value


def _name(scope: str, selector: str, arg: str) -> str:
    return f"{scope + '/' if scope else ''}{selector}.{arg}"


def _required_macro(value, bindings: Bindings) -> str | None:
    """The macro name a ``%gin.REQUIRED`` came through (for the message), if any."""
    while isinstance(value, Macro) and value.name in bindings.macros:
        inner = bindings.macros[value.name][0]
        if isinstance(inner, Macro) and inner.name == "gin.REQUIRED":
            return value.name
        value = inner
    return None


def _delegate():
    from gin import config_parser

    class Delegate(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_name, evaluate):
            return Ref(scoped_name, bool(evaluate))

        def macro(self, scoped_name):
            return Macro(scoped_name)

    return Delegate()


def _parse_text(text: str, origin: str, bindings: Bindings, include) -> None:
    from gin import config_parser

    try:
        for statement in config_parser.ConfigParser(text, _delegate()):
            line = getattr(statement.location, "line_num", None)
            where = f"{origin}:{line}" if line else origin
            if isinstance(statement, config_parser.BindingStatement):
                bindings.bind(
                    statement.scope, statement.selector, statement.arg_name, statement.value, where
                )
            elif isinstance(statement, config_parser.IncludeStatement):
                include(statement.filename, where)
            # ImportStatement, BlockDeclaration: nothing to do (nothing is imported)
    except SyntaxError as e:
        raise ConfigError(f"gin: {origin}:{e.lineno or '?'}: {e.msg}") from None


def _find_include(name: str, including: str, search_paths: Sequence[str]) -> str | None:
    """Where ``include 'name'`` points: as given (absolute or from the working directory), under
    each search path, or under the including file's directory or one of its parents (so the
    files of a t5x / flaxformer checkout find each other by their repository paths)."""
    candidates = [name, *(os.path.join(p, name) for p in search_paths)]
    directory = os.path.dirname(os.path.abspath(including)) if including else os.getcwd()
    while True:
        candidates.append(os.path.join(directory, name))
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return next((c for c in candidates if os.path.isfile(c)), None)


def parse(
    files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()
) -> Bindings:
    """The bindings of ``files`` (in order, includes inline) and then of ``bindings``
    (``NAME=value`` strings, as ``--gin.NAME=value``)."""
    out = Bindings()
    stack: list[str] = []

    def read_file(path: str, where: str) -> None:
        real = os.path.realpath(path)
        if real in stack:
            raise ConfigError(f"gin: {where}: {path} includes itself")
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise ConfigError(f"gin: {where}: includes nested deeper than {MAX_INCLUDE_DEPTH}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"gin: cannot read {path} ({where}): {e}") from None
        stack.append(real)
        out.files.append(path)

        def include(name: str, at: str) -> None:
            found = _find_include(name, path, search_paths)
            if found is None:
                raise ConfigError(
                    f"gin: {at}: include {name!r} not found (as given, under --gin_search_paths "
                    "or under the including file's directories)"
                )
            read_file(found, at)

        _parse_text(text, path, out, include)
        stack.pop()

    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"gin: --gin_file {path!r} not found")
        read_file(path, "--gin_file")

    def no_include(name: str, at: str) -> None:
        raise ConfigError(f"gin: {at}: include is not allowed in a --gin. binding")

    for item in bindings:
        name, sep, value = item.removeprefix("--gin.").partition("=")
        if not sep or not name:
            raise ConfigError(f"gin: binding {item!r}: expected --gin.NAME=VALUE")
        try:
            _parse_text(f"{name} = {value}\n", f"--gin.{name}", out, no_include)
        except ConfigError:
            if not re.fullmatch(r"[\w./:@~+-]+", value) or value[0] in "@%":
                raise
            # T5X wants a quoted string (--gin.MODEL_DIR="'gs://…'"); a bare path is taken as one
            _parse_text(f"{name} = {value!r}\n", f"--gin.{name}", out, no_include)
    return out
