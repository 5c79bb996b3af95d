"""Pytrees <-> Flower records: every state and message of a method travels as one ArrayRecord.

A tree is flattened to its array leaves (ArrayRecord keys "0", "1", ...) and a JSON *skeleton*
(in a ConfigRecord) that names each node: a dict, list/tuple, None, a leaf (with its dtype, so
bfloat16 arrays, which Flower returns as raw `|V2` bytes, are viewed back) or a
`flax.struct` dataclass of this package (by module and name; any other class is refused, so a
peer can make the receiver build nothing but our own state types). No pickle.

    content = encode({"plan": msg, "clients": rows})          # -> RecordDict
    trees = decode(content)                                    # -> {"plan": ..., "clients": ...}
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

META = "meta"  # ConfigRecord of plain values (round, mode, client ids, errors)
_SKELETON = "skeletons"  # ConfigRecord: tree name -> skeleton JSON
_PACKAGE = "fedrouter_jax."


def skeleton(tree: Any, leaves: list) -> Any:
    """JSON-able description of `tree`; appends its array leaves to `leaves` (host numpy)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {"dict": {str(k): skeleton(v, leaves) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {"seq": [skeleton(v, leaves) for v in tree], "tuple": isinstance(tree, tuple)}
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        cls = type(tree)
        return {"class": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: skeleton(getattr(tree, f.name), leaves) for f in dataclasses.fields(tree)}}
    x = np.asarray(tree)
    leaves.append(x)
    return {"leaf": len(leaves) - 1, "dtype": x.dtype.name, "shape": list(x.shape)}


def _our_class(path: str) -> type:
    module, _, name = path.partition(":")
    if not module.startswith(_PACKAGE):
        raise ValueError(f"records: refusing to build {path!r} (only fedrouter_jax state types travel)")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise ValueError(f"records: {path!r} is not a dataclass of fedrouter_jax")
    return cls


def build(skel: Any, leaf: Any) -> Any:
    """The tree a skeleton describes, leaf i being `leaf(i, dtype, shape)`."""
    if skel is None:
        return None
    if "dict" in skel:
        return {k: build(v, leaf) for k, v in skel["dict"].items()}
    if "seq" in skel:
        items = [build(v, leaf) for v in skel["seq"]]
        return tuple(items) if skel["tuple"] else items
    if "class" in skel:
        return _our_class(skel["class"])(**{k: build(v, leaf) for k, v in skel["fields"].items()})
    return leaf(skel["leaf"], skel["dtype"], tuple(skel["shape"]))


def _restore(x: np.ndarray, dtype: str, shape: tuple) -> np.ndarray:
    want = jnp.dtype(dtype)  # knows bfloat16 (ml_dtypes)
    return (x if x.dtype == want else x.view(want)).reshape(shape)  # 0-d leaves come back [1]


def encode(trees: dict[str, Any], meta: dict | None = None) -> RecordDict:
    """Named pytrees (+ plain JSON-able metadata) -> one RecordDict."""
    content, skels = {}, {}
    for name, tree in trees.items():
        leaves: list = []
        skels[name] = json.dumps(skeleton(jax.tree.map(np.asarray, tree), leaves))
        content[name] = ArrayRecord({str(i): Array(np.ascontiguousarray(x)) for i, x in enumerate(leaves)})
    content[_SKELETON] = ConfigRecord(skels)
    content[META] = ConfigRecord({"json": json.dumps(meta or {})})
    return RecordDict(content)


def decode(content: RecordDict) -> tuple[dict[str, Any], dict]:
    """RecordDict -> (named pytrees of host numpy arrays, metadata)."""
    skels = content.config_records[_SKELETON]
    trees = {}
    for name, text in skels.items():
        arrays = content.array_records[name]
        trees[name] = build(json.loads(text), lambda i, dtype, shape: _restore(arrays[str(i)].numpy(), dtype, shape))
    return trees, json.loads(content.config_records[META]["json"])


def abstract(skel: Any) -> Any:
    """The tree of a skeleton with `jax.ShapeDtypeStruct` leaves (a checkpoint restore target)."""
    return build(skel, lambda i, dtype, shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))


def describe(tree: Any) -> Any:
    """The skeleton of a tree alone (no leaves kept)."""
    return skeleton(tree, [])
