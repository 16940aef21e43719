"""Every module of the package imports, and every third-party module it imports is one that the
plain install (``install_requires``, no ``test`` extra) brings.

CI also runs this file as a script inside a venv made by the README's plain set-up, where
pytest is not installed: ``.venv-plain/bin/python tests/test_imports.py``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pathlib
import pkgutil
import re
import sys

PACKAGE = "sparse_upcycle"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
# Modules that run something when imported (``python -m sparse_upcycle``).
RUN_ON_IMPORT = {f"{PACKAGE}.__main__"}


def package_modules() -> list[str]:
    pkg = importlib.import_module(PACKAGE)
    names = [PACKAGE]
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{PACKAGE}."):
        names.append(info.name)
    return sorted(set(names) - RUN_ON_IMPORT)


def third_party_imports() -> dict[str, list[str]]:
    """Top-level names of the non-stdlib modules the package's source imports -> files."""
    found: dict[str, list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == PACKAGE or top in sys.stdlib_module_names or top == "__future__":
                    continue
                found.setdefault(top, []).append(str(path.relative_to(ROOT.parent)))
    return found


def declared_distributions() -> set[str]:
    """Distribution names in the installed package's requirements, without any extra."""
    requires = importlib.metadata.requires(PACKAGE) or []
    plain = [r for r in requires if "extra ==" not in r]
    return {_normalise(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in plain}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_module_imports():
    failed = {}
    for name in package_modules():
        try:
            importlib.import_module(name)
        except Exception as e:  # report all of them, not only the first
            failed[name] = f"{type(e).__name__}: {e}"
    assert not failed, failed
    assert len(package_modules()) > 30  # the walk found the package, not an empty directory


def test_every_third_party_import_is_an_install_requirement():
    declared = declared_distributions()
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in third_party_imports().items():
        dists = {_normalise(d) for d in providers.get(module, [])}
        if not dists & declared:
            missing[module] = {"provided_by": sorted(dists), "imported_in": sorted(set(files))}
    assert not missing, f"imported but not in install_requires: {missing}"
    # The scan is not vacuous: the core libraries are among what it found.
    assert {"jax", "flax", "safetensors", "tensorstore"} <= set(third_party_imports())


if __name__ == "__main__":
    test_every_third_party_import_is_an_install_requirement()
    test_every_module_imports()
    print(f"{len(package_modules())} modules import; every third-party import is required")
