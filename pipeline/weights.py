"""`misalign weights check` and `misalign weights fetch`: the weights the current params need.

The pipeline itself never downloads (a run is reproducible from what is on disk); these two
commands say what is there and fill the caches once, through huggingface_hub and open_clip's own
download, so that `misalign weights fetch && dvc repro` does the whole job on a machine with
network.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from pipeline.errors import MisalignError
from pipeline.provenance import _FIELDS, needed_roles

logger = logging.getLogger(__name__)

# Files a transformers model never needs when it loads from PyTorch weights.
_OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "*.mlmodel", "*.gguf"]
_PICKLED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]
# The way to run with no weights and no network, named by every message about missing weights.
OFFLINE_WAY = "or run offline with small random models: `dvc exp run -S models.preset=tiny`"


class WeightsFetchError(MisalignError, RuntimeError):
    """A download failed (offline, hub unreachable, unknown repo); the message says why."""


@dataclass(frozen=True)
class WeightsStatus:
    role: str
    model: str
    present: bool
    where: str  # the file or folder found, or every place looked


def _model_name(params: Any, role: str) -> str:
    spec = getattr(params.models, _FIELDS[role])
    return f"{spec.id}/{spec.pretrained}" if role == "clip" else spec.id


def check(params: Any) -> list[WeightsStatus]:
    """Where each model the params need is, or where it was looked for (no network)."""
    from pipeline.models.clip import find_checkpoint
    from pipeline.models.hf import ModelWeightsMissing, resolve_weights

    out = []
    for role in needed_roles(params):
        name = _model_name(params, role)
        spec = getattr(params.models, _FIELDS[role])
        try:
            if role == "clip":
                where = str(find_checkpoint(spec.id, spec.pretrained, spec.path))
            else:
                src = resolve_weights(spec.id, spec.path or None, _FIELDS[role])
                where = src.ref if spec.path else f"{src.where} ({src.weights_id})"
            out.append(WeightsStatus(role, name, True, where))
        except ModelWeightsMissing as err:
            out.append(WeightsStatus(role, name, False, getattr(err, "where", "") or str(err)))
    return out


def _offline_reason() -> str:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set (unset it to download)"
    return ""


def _hf_snapshot(repo: str, timeout: float) -> str:
    """Download `repo` into the HF cache: safetensors only where the repo has them, never the
    TensorFlow / Flax / ONNX copies."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo)  # one request: fails fast when unreachable
    ignore = list(_OTHER_FRAMEWORKS)
    if any(f.endswith(".safetensors") for f in files):
        ignore += _PICKLED
    return str(snapshot_download(repo, ignore_patterns=ignore, etag_timeout=timeout))


def _probe(url: str, timeout: float) -> None:
    """One request, no retries: an unreachable hub fails here in seconds, not after the
    minutes of back-off that huggingface_hub spends on each file."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the server answered (401/404 are reported by the download itself)
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsFetchError(
            f"cannot reach {url}: {reason}; check the network (or HF_ENDPOINT), copy the "
            f"weights from a machine that has them and set models.<role>.path, {OFFLINE_WAY}"
        ) from err


def _source_url(params: Any, role: str) -> str:
    """The URL a role's weights come from (what `_probe` knocks on)."""
    from huggingface_hub import constants

    spec = getattr(params.models, _FIELDS[role])
    if role != "clip":
        return f"{constants.ENDPOINT}/api/models/{spec.id}"
    import open_clip

    from pipeline.models.clip import hub_files

    cfg = open_clip.get_pretrained_cfg(spec.id, spec.pretrained) or {}
    repo, _ = hub_files(cfg)
    return f"{constants.ENDPOINT}/api/models/{repo}" if repo else str(cfg.get("url", ""))


def _clip_download(name: str, pretrained: str) -> str:
    """open_clip's own download of a pretrained tag (hub first, safetensors when offered)."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise WeightsFetchError(
            f"open_clip has no pretrained tag {pretrained!r} for {name!r}; known tags: "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}"
        )
    return str(download_pretrained(cfg))


def fetch(params: Any, timeout: float = 15.0) -> list[WeightsStatus]:
    """Download every needed model that `check` finds missing; returns the new statuses.

    Raises:
        WeightsFetchError: offline or a download failed, naming the model and the reason.
    """
    if params.models.preset == "tiny":
        return []
    missing = [s for s in check(params) if not s.present]
    if not missing:
        return check(params)
    todo = [s for s in missing if not getattr(params.models, _FIELDS[s.role]).path]
    local = [s for s in missing if s not in todo]
    if local:
        raise WeightsFetchError(
            "; ".join(
                f"{s.model}: models.{_FIELDS[s.role]}.path points at {s.where}" for s in local
            )
            + "; a local path is never downloaded to: fix the path or clear it to use the cache"
        )
    offline = _offline_reason()
    if offline:
        names = ", ".join(s.model for s in todo)
        raise WeightsFetchError(f"cannot download {names}: {offline}; {OFFLINE_WAY}")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout)))
    for status in todo:
        spec = getattr(params.models, _FIELDS[status.role])
        url = _source_url(params, status.role)
        if url:
            _probe(url, timeout)
        logger.info("downloading %s (%s)", status.model, status.role)
        try:
            if status.role == "clip":
                _clip_download(spec.id, spec.pretrained)
            else:
                _hf_snapshot(spec.id, timeout)
        except WeightsFetchError:
            raise
        except Exception as err:  # network, auth, unknown repo: all reported the same way
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise WeightsFetchError(
                f"cannot download {status.model} ({status.role}): {type(err).__name__}: "
                f"{reason}; {OFFLINE_WAY}"
            ) from err
    return check(params)


def format_statuses(statuses: list[WeightsStatus]) -> str:
    lines = []
    for s in statuses:
        state = "present" if s.present else "MISSING"
        verb = "at" if s.present else "looked in"
        lines.append(f"{state:8s} {s.role:10s} {s.model}  {verb} {s.where}")
    return "\n".join(lines)
