"""Save and load fitted heads as head.json + weights.safetensors (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.utils.validation import check_is_fitted

from pipeline.errors import ModelFileError, shown
from pipeline.heads.contract import BaseHead
from pipeline.heads.registry import HEADS, name_of
from pipeline.rows.atomic import atomic_path, write_text

FORMAT_VERSION = 1
META_FILE = "head.json"
WEIGHTS_FILE = "weights.safetensors"


def save_head(head: BaseHead, directory: Path, provenance: dict[str, Any] | None = None) -> None:
    """Write a fitted head to `directory` without pickle.

    `head.json` holds the registry name, class, `get_params()` and small learned metadata such
    as `classes_`; `weights.safetensors` holds every array. Sub-heads of a meta head go to
    subdirectories named in `head.json`.

    Args:
        head: a fitted head from `pipeline.heads.HEADS`.
        directory: created if missing; existing head files in it are overwritten.
        provenance: what made the training features (`{"preset", "models"}`), stored in
            head.json as `provenance` so that the head carries it wherever it is copied.
    """
    name = name_of(head)
    check_is_fitted(head)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    params = {
        key: _encode(value, f"params.{key}", arrays)
        for key, value in head.get_params(False).items()
    }
    state, state_arrays = head._get_state()
    for key, value in state_arrays.items():
        arrays[f"state.{key}"] = value
    fitted: dict[str, Any] = {
        "classes_": _encode(head.classes_, "fitted.classes_", arrays),
        "n_features_in_": int(head.n_features_in_),
    }
    if hasattr(head, "feature_names_in_"):
        fitted["feature_names_in_"] = [str(f) for f in head.feature_names_in_]
    children = []
    for subdir, child in head._children():
        save_head(child, directory / subdir)
        children.append(subdir)
    meta = {
        "format_version": FORMAT_VERSION,
        "head": name,
        "class": type(head).__name__,
        "params": params,
        "fitted": fitted,
        "state": {k: _encode(v, f"state.{k}", arrays) for k, v in state.items()},
        "children": children,
    }
    if provenance is not None:
        meta["provenance"] = provenance
    text = json.dumps(meta, indent=2, allow_nan=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)
    write_text(directory / META_FILE, text + "\n")


def load_head(directory: Path) -> BaseHead:
    """Rebuild a head written by `save_head`; it predicts exactly as the saved one.

    Every file is checked before it is trusted: head.json must be this format's JSON naming a
    known head, weights.safetensors a safetensors file (a pickle or TorchScript file is refused
    by its content, whatever its name) with finite values only, and the rebuilt head must
    produce finite probabilities of the saved shape.

    Args:
        directory: a directory containing head.json and weights.safetensors.

    Returns:
        The fitted head.

    Raises:
        ModelFileError: one line naming the bad file, what is wrong, and the fix.
    """
    # pipeline.models (the package) imports torch and huggingface_hub; only loading a head
    # needs its weights-file check.
    from pipeline.weight_files import check_weights_file

    directory = Path(directory)
    meta_path = directory / META_FILE
    weights_path = directory / WEIGHTS_FILE
    fix = "retrain the head (dvc repro train) or restore the folder from a good copy"
    if not meta_path.is_file():
        raise ModelFileError(
            f"no {META_FILE} in {directory}; point at a head folder written by save_head "
            "(e.g. models/mlp), or run the train stage first"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # ValueError also covers an integer of more digits than Python converts (4300).
        reason = " ".join(str(err).split())[:160]
        raise ModelFileError(f"{meta_path} is not valid JSON ({reason}); {fix}") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{meta_path} does not hold a JSON object; {fix}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{meta_path} has format_version {shown(meta.get('format_version'))}, this code reads "
            f"{FORMAT_VERSION}; re-save the head with this version of misalign"
        )
    name = meta.get("head")
    if not isinstance(name, str) or name not in HEADS:
        raise ModelFileError(f"{meta_path} names head {shown(name)}; known heads: {sorted(HEADS)}")
    if meta.get("class") != HEADS[name].__name__:
        raise ModelFileError(
            f"{meta_path} says head {shown(name)} but class {shown(meta.get('class'))} (expected "
            f"{HEADS[name].__name__}); {fix}"
        )
    missing = [k for k in ("params", "fitted", "state", "children") if k not in meta]
    if missing:
        raise ModelFileError(f"{meta_path} lacks {missing}; {fix}")
    if not weights_path.is_file():
        raise ModelFileError(f"{weights_path} is missing; {fix}")
    check_weights_file(weights_path, f"{name} head weights")
    try:
        arrays = load_file(weights_path)
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
        raise ModelFileError(
            f"{weights_path} cannot be read as safetensors ({err}); {fix}"
        ) from err
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ModelFileError(
                f"{weights_path}: array {key!r} holds NaN or infinite values; {fix}"
            )
    try:
        params = {k: _decode(v, arrays) for k, v in meta["params"].items()}
        head = HEADS[name](**params)
        fitted = meta["fitted"]
        head.classes_ = _decode(fitted["classes_"], arrays)
        head.n_features_in_ = _count(fitted["n_features_in_"], meta_path, fix)
        if "feature_names_in_" in fitted:
            head.feature_names_in_ = np.asarray(fitted["feature_names_in_"], dtype=object)
        state = {k: _decode(v, arrays) for k, v in meta["state"].items()}
        prefix = "state."
        state_arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        head._set_state(state, state_arrays)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as err:
        raise ModelFileError(
            f"{meta_path} and {weights_path} do not describe a {name} head "
            f"({type(err).__name__}: {shown(str(err))}); {fix}"
        ) from err
    children = meta["children"]
    if not isinstance(children, list) or not all(
        isinstance(c, str) and c and "/" not in c and ".." not in c for c in children
    ):
        raise ModelFileError(
            f"{meta_path}: children must be sub-folder names, got {shown(children)}"
        )
    head._set_children([load_head(directory / sub) for sub in children])
    # The trial prediction allocates (2, n_features_in_): bounded by the arrays actually in
    # the files (a head's features are a dimension of its weights, or of its sub-heads').
    dims = [int(d) for a in arrays.values() for d in a.shape]
    dims += [int(child.n_features_in_) for _, child in head._children()]
    if head.n_features_in_ > max(dims, default=0):
        raise ModelFileError(
            f"{meta_path}: n_features_in_ = {head.n_features_in_} is larger than any array in "
            f"{weights_path} ({max(dims, default=0)}); {fix}"
        )
    _check_predicts(head, meta_path, fix)
    return head


def _count(value: Any, meta_path: Path, fix: str) -> int:
    """A positive whole number from head.json, refused (not converted) when it is anything
    else: a float such as 1e12 or 1e400 (infinite once parsed), a string, a boolean."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelFileError(
            f"{meta_path}: n_features_in_ = {shown(value)} is not a positive whole number; {fix}"
        )
    return value


def _check_predicts(head: BaseHead, meta_path: Path, fix: str) -> None:
    """A loaded head must map a row to finite probabilities over its saved classes."""
    try:
        n_in = int(head.n_features_in_)
        proba = np.asarray(head.predict_proba(np.zeros((2, n_in))))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        raise ModelFileError(
            f"the head in {meta_path.parent} cannot predict with its saved arrays "
            f"({type(err).__name__}: {err}); {fix}"
        ) from err
    n_classes = len(np.asarray(head.classes_))
    if proba.shape != (2, n_classes) or not np.isfinite(proba).all():
        raise ModelFileError(
            f"the head in {meta_path.parent} predicts {proba.shape} values (finite: "
            f"{bool(np.isfinite(proba).all())}) instead of finite probabilities for "
            f"{n_classes} classes; {fix}"
        )


def _encode(value: Any, key: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON form of a parameter or metadata value; arrays go to `arrays` under `key`.

    Tuples and dicts with non-string keys are tagged so that `_decode` restores them exactly
    (`get_params()` of a loaded head equals the saved one).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        return _encode(value.item(), key, arrays)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            arrays[key] = value
            return {"__array__": key}
        if value.dtype.kind == "U":
            return {"__str_array__": value.tolist(), "dtype": value.dtype.str}
        if value.dtype.kind == "O":
            return {"__object_array__": [_encode(v, key, arrays) for v in value.tolist()]}
        raise TypeError(f"cannot save array {key} of dtype {value.dtype}")
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", arrays) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", arrays) for i, v in enumerate(value)]
    if isinstance(value, dict):
        items = [(k, _encode(v, f"{key}.{k}", arrays)) for k, v in value.items()]
        if all(isinstance(k, str) and not k.startswith("__") for k, _ in items):
            return dict(items)
        return {"__dict__": [[_encode(k, key, arrays), v] for k, v in items]}
    raise TypeError(
        f"cannot save {key}={shown(value)} of type {type(value).__name__} in head.json; "
        "use an int random_state and plain numbers, strings, tuples, dicts or arrays"
    )


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "__array__" in value:
        return arrays[value["__array__"]]
    if "__str_array__" in value:
        return np.asarray(value["__str_array__"], dtype=value["dtype"])
    if "__object_array__" in value:
        out = np.empty(len(value["__object_array__"]), dtype=object)
        out[:] = [_decode(v, arrays) for v in value["__object_array__"]]
        return out
    if "__tuple__" in value:
        return tuple(_decode(v, arrays) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_hashable(_decode(k, arrays)): _decode(v, arrays) for k, v in value["__dict__"]}
    return {k: _decode(v, arrays) for k, v in value.items()}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
