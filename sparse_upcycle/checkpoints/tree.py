"""Nested parameter dicts <-> flat ``{"a/b/c": array}`` dicts (the boundary format)."""

from __future__ import annotations

from collections.abc import Mapping


def flatten(tree: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def key_name(key) -> str:
    """One entry of a jax key path (dict key, attribute or sequence index) as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path) -> str:
    """A jax key path as an ``a/b/c`` string."""
    return "/".join(key_name(k) for k in path)


class LazyTree(Mapping):
    """A nested read-only view of flat ``a/b/c`` keys: subtrees are ``LazyTree`` views, and a
    leaf is read with ``read(key)`` only when it is looked up (one tensor at a time)."""

    def __init__(self, keys, read, prefix: str = ""):
        self._keys, self._read, self._prefix = list(keys), read, prefix
        children: dict[str, bool] = {}
        for key in self._keys:
            if prefix and not key.startswith(prefix + "/"):
                continue
            head, _, rest = key[len(prefix) + 1 if prefix else 0 :].partition("/")
            children[head] = children.get(head, False) or bool(rest)
        self._children = children  # name -> is a subtree

    def __getitem__(self, name: str):
        is_tree = self._children[name]
        path = f"{self._prefix}/{name}" if self._prefix else name
        if is_tree:
            return LazyTree((k for k in self._keys if k.startswith(path + "/")), self._read, path)
        return self._read(path)

    def __iter__(self):
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._children)
