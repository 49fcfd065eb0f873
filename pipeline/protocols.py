"""Named protocols of the seed papers: a file of params overrides per protocol, shipped inside
the package (pipeline/protocol_files/, package data), so that an installed wheel has them.

`misalign protocol item --data-root /data` prints the `-S key=value` arguments, so that
`eval "dvc exp run $(misalign protocol item --data-root /data)"` runs the protocol as a tracked
experiment without editing params.yaml.
"""

from __future__ import annotations

import shlex
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import yaml

from pipeline.config import ConfigError
from pipeline.errors import shown


def protocol_dir() -> Traversable:
    return resources.files("pipeline") / "protocol_files"


def _load(name: str) -> dict[str, Any]:
    path = protocol_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(list_protocols())) or "none"
        raise ConfigError(f"unknown protocol {shown(name)}; known protocols: {known}")
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def list_protocols() -> dict[str, str]:
    """Protocol name -> one-line description."""
    files = sorted(
        (p for p in protocol_dir().iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name
    )
    return {
        p.name.removesuffix(".yaml"): " ".join(
            str(yaml.safe_load(p.read_text()).get("description", "")).split()
        )
        for p in files
    }


def _has_key(tree: Any, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def protocol_args(
    name: str, data_root: str = "", existing: dict[str, Any] | None = None
) -> list[str]:
    """`-S key=value` arguments of a protocol, with `{data_root}` filled in (shell-quoted).

    A key that `existing` (the parsed params.yaml; the built-in defaults when not given) already
    has is set with a plain `-S key=value`, so DVC's own check of the key applies; only keys that
    are new there (a dataset name under `evaluate.datasets`, say) get Hydra's `++`.
    """
    if existing is None:
        from pipeline.config import Params, to_dict

        existing = to_dict(Params())
    params = _load(name).get("params", {})
    out: list[str] = []
    for key, value in params.items():
        text = str(value)
        if "{data_root}" in text:
            if not data_root:
                raise ConfigError(
                    f"protocol {shown(name)} reads datasets under --data-root (for {key}); give the "
                    "folder that holds them"
                )
            text = text.replace("{data_root}", data_root.rstrip("/"))
        # "++" (Hydra syntax, as DVC uses it) adds a key params.yaml does not have yet; the
        # check stage still refuses it if the key is unknown to the config.
        prefix = "" if _has_key(existing, key) else "++"
        out += ["-S", shlex.quote(f"{prefix}{key}={text}")]
    return out
