"""A row is reused only when nothing that shaped it changed (code version, weights, dtype,
device class, params, upstream content), shards say what made them, folders of mixed shards
are refused, and an image's rows do not depend on its batch partners.

Each step's output on a fixed fixture is pinned in tests/golden/step_outputs.json together
with the step's version: changing what a step writes without bumping `STEP_VERSIONS` fails
`test_step_outputs_are_pinned_to_their_version`. After a deliberate change, bump the version and
record the new output with `python -m tests.test_cache_key --update`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import load_params
from pipeline.evalsets import extract_dataset
from pipeline.extract.encode import EncodeStep
from pipeline.rows import store
from pipeline.rows.key import STEP_VERSIONS
from pipeline.rows.runner import timings_path
from tests.helpers import ROOT, SAMPLE

GOLDEN = Path(__file__).parent / "golden" / "step_outputs.json"
STAGES = ("captions", "objects", "clip")


def _params(tmp: Path, **overrides):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["preset"] = "tiny"
    params["ingest"]["shard_size"] = 4
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path = tmp / f"params_{hashlib.sha1(repr(overrides).encode()).hexdigest()[:8]}.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_params(path)


def _sample_rows() -> list[dict[str, str]]:
    with (SAMPLE / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _dataset(dest: Path, rows: list[dict[str, str]], scale: int = 4) -> Path:
    """Shipped sample images shrunk by `scale` (their sizes and aspect ratios still differ),
    with explicit splits, so that a dataset's rows do not depend on which others it holds."""
    out = []
    for row in rows:
        src = SAMPLE / row["file"]
        target = dest / "images" / (Path(row["file"]).stem + ".png")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                im = im.convert("RGB")
                im.resize((max(32, im.width // scale), max(32, im.height // scale))).save(target)
        split = ("train", "train", "val", "test")[int(row["sha256"][:2], 16) % 4]
        out.append(
            {
                "path": target.relative_to(dest).as_posix(),
                "label": row["label"],
                "generator": row["generator"],
                "caption": row["caption"],
                "split": split,
            }
        )
    dest.mkdir(parents=True, exist_ok=True)
    with (dest / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    return dest


def _fixture_rows(n: int) -> list[dict[str, str]]:
    """n sample rows, generators and real photos alternating; real photos without a caption
    (BLIP-2 captions them) come first."""
    gens, seen = [], set()
    all_rows = _sample_rows()
    for row in all_rows:
        if row["generator"] != "real" and row["generator"] not in seen:
            seen.add(row["generator"])
            gens.append(row)
    reals = sorted(
        (r for r in all_rows if r["generator"] == "real"), key=lambda r: bool(r["caption"])
    )
    mixed = [r for pair in zip(gens, reals) for r in pair] + reals[len(gens) :]
    return mixed[:n]


def _by_id(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every row of a stage folder, keyed by image id (objects sliced by `obj_offsets`)."""
    rows: dict[str, dict[str, np.ndarray]] = {}
    for path in store.list_shards(directory):
        data = store.read_shard(path)
        for i, cid in enumerate(data["ids"]):
            one = store.take_rows(data, [i])
            rows[str(cid)] = {k: v for k, v in one.items() if k not in ("ids",)}
    return rows


def _n_processed(cache: Path, stage: str) -> int:
    return int(json.loads(timings_path(cache / stage).read_text())["n_processed"])


# ------------------------------------------------------------------------- fixed small fixture


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Six images (some captioned by BLIP-2) through caption, ground, encode, features."""
    work = tmp_path_factory.mktemp("cachekey")
    data = _dataset(work / "data", _fixture_rows(6))
    params = _params(work)
    extract_dataset(data, work / "cache", "t", params)
    return work, data, params


def _copy(small, tmp_path) -> Path:
    work = small[0]
    shutil.copytree(work / "cache", tmp_path / "cache")
    return tmp_path / "cache"


def _digest(cache: Path) -> dict[str, dict[str, object]]:
    """A compact fingerprint of each step's output: strings exactly, float datasets through a
    fixed random projection per row (any change of a value moves it)."""
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, object]] = {}
    for stage in STAGES:
        data = store.concat_rows([store.read_shard(p) for p in store.list_shards(cache / stage)])
        order = np.argsort(data["ids"])
        data = store.take_rows(data, order.tolist())
        fingerprint: dict[str, object] = {}
        for key in sorted(data):
            if key in ("ids", "input_hash"):
                continue
            arr = np.asarray(data[key])
            if arr.dtype == object:
                fingerprint[key] = [str(v) for v in arr]
            elif arr.dtype.kind in "iu":
                fingerprint[key] = arr.tolist()
            else:
                flat = arr.reshape(len(arr), -1).astype(np.float64)
                proj = (
                    rng.standard_normal((flat.shape[1], 3)) if flat.shape[1] else np.zeros((0, 3))
                )
                fingerprint[key] = np.round(flat @ proj, 4).tolist()
        out[stage] = fingerprint
    return out


def test_step_outputs_are_pinned_to_their_version(small):
    """Changing what a step writes without bumping its version fails here; a refactor that keeps
    the output passes (and, the version being unchanged, invalidates no cached row)."""
    golden = json.loads(GOLDEN.read_text())
    now = _digest(small[0] / "cache")
    for stage in STAGES:
        pinned = golden[stage]
        assert pinned["version"] == STEP_VERSIONS[stage], (
            f"STEP_VERSIONS[{stage!r}] is {STEP_VERSIONS[stage]} but the pinned output is "
            f"of version {pinned['version']}: record the new output with "
            "`python -m tests.test_cache_key --update`"
        )
        assert set(now[stage]) == set(pinned["output"]), stage
        for key, value in pinned["output"].items():
            got = now[stage][key]
            if value and isinstance(value[0], str):
                assert got == value, (
                    f"{stage}/{key} changed without a version bump: bump "
                    f"pipeline.rows.key.STEP_VERSIONS[{stage!r}] and run "
                    "`python -m tests.test_cache_key --update`"
                )
            else:
                a, b = np.asarray(got, dtype=np.float64), np.asarray(value, dtype=np.float64)
                assert a.shape == b.shape and np.allclose(a, b, atol=2e-3, rtol=1e-3), (
                    f"{stage}/{key} changed without a version bump: bump "
                    f"pipeline.rows.key.STEP_VERSIONS[{stage!r}] and run "
                    "`python -m tests.test_cache_key --update`"
                )


def test_shards_say_what_made_them(small):
    cache = small[0] / "cache"
    for stage, role in (("captions", "blip2"), ("objects", "grounder"), ("clip", "clip")):
        attrs = store.dataset_attrs(cache / stage)
        assert attrs["dtype"] == "float32" and attrs["device_class"] == "cpu"
        assert attrs["step_version"] == STEP_VERSIONS[stage]
        weights = json.loads(attrs["weights"])
        assert attrs["model"] == weights[role] and "seed0" in weights[role]
        chain = json.loads(attrs["provenance"])
        assert chain[stage]["dtype"] == "float32"
    assert set(json.loads(store.dataset_attrs(cache / "features")["provenance"])) == {
        *STAGES,
        "features",
    }


def test_a_step_version_bump_recomputes_that_step_only(small, tmp_path, monkeypatch):
    work, data, params = small
    cache = _copy(small, tmp_path)
    before = _by_id(cache / "clip")
    monkeypatch.setitem(STEP_VERSIONS, "objects", STEP_VERSIONS["objects"] + 1)
    extract_dataset(data, cache, "t", params)
    assert _n_processed(cache, "captions") == 0
    assert _n_processed(cache, "objects") == 6  # every row of the bumped step
    # Its output is the same, so downstream rows keep their inputs and are reused.
    assert _n_processed(cache, "clip") == 0
    assert store.dataset_attrs(cache / "objects")["step_version"] == STEP_VERSIONS["objects"]
    after = _by_id(cache / "clip")
    for cid, row in before.items():
        np.testing.assert_array_equal(row["image_emb"], after[cid]["image_emb"])


def test_a_dtype_change_recomputes_every_encode_row(small, tmp_path):
    """float32 → bfloat16 (float16 is the GPU case; bfloat16 is what runs on a CPU)."""
    work, data, _ = small
    cache = _copy(small, tmp_path)
    before = _by_id(cache / "clip")
    params = _params(tmp_path, **{"base.dtype": "bfloat16"})
    extract_dataset(data, cache, "t", params)
    assert _n_processed(cache, "clip") == 6
    for stage in STAGES:
        assert store.dataset_attrs(cache / stage)["dtype"] == "bfloat16"
    after = _by_id(cache / "clip")
    assert any(not np.array_equal(before[c]["image_emb"], after[c]["image_emb"]) for c in before)
    assert store.dataset_attrs(cache / "features")["dtype"] == "bfloat16"


def test_the_key_has_the_resolved_dtype_and_the_device_class(tmp_path):
    from pipeline.config import BaseConfig
    from pipeline.models.identity import runtime_class

    def key(**base):
        p = _params(tmp_path, **{f"base.{k}": v for k, v in base.items()})
        step = EncodeStep(Path("i"), Path("c"), Path("o"), p.encode, 0.1, p.models, p.base, "t")
        return step.params_hash()

    assert key(dtype="auto", device="cpu") == key(dtype="float32", device="cpu")
    assert key(dtype="float16", device="cpu") != key(dtype="float32", device="cpu")
    assert key(dtype="float32", device="cuda") != key(dtype="float32", device="cpu")
    assert key(dtype="auto", device="cuda") == key(dtype="float16", device="cuda")
    # Which card is not part of the key (a Dask worker on cuda:1 reuses cuda:0's rows).
    assert runtime_class(BaseConfig(device="cuda:1", dtype="auto")) == {
        "dtype": "float16",
        "device_class": "cuda",
    }


def test_shards_of_different_runs_are_refused(small, tmp_path):
    from pipeline.features import load_features, run_features

    work, data, params = small
    cache = _copy(small, tmp_path)
    shards = store.list_shards(cache / "clip")
    assert len(shards) == 2
    with h5py.File(shards[1], "a") as fh:  # as if made by a float16 run
        fh.attrs["dtype"] = "float16"
    with pytest.raises(store.ShardError) as err:
        run_features(cache / "ingest", cache / "clip", cache / "features2", params.features, "t")
    message = str(err.value)
    assert "dtype" in message and "shard_00001.h5" in message and "float16" in message
    assert "shard_00000.h5" in message and f"rm -r {cache / 'clip'}" in message
    fshards = store.list_shards(cache / "features")
    with h5py.File(fshards[0], "a") as fh:
        fh.attrs["model"] = "other-clip@sha256:0123"
    with pytest.raises(store.ShardError, match="model"):
        load_features(cache / "features")
    # The row cache itself still reads them (it reuses by key) and rebuilds a uniform folder.
    extract_dataset(data, cache, "t", params)
    assert _n_processed(cache, "clip") == 0
    assert store.dataset_attrs(cache / "clip")["dtype"] == "float32"


def test_new_weights_at_the_same_path_are_a_new_key(tmp_path, monkeypatch):
    """The key has the weights' content, not their path; the digest is computed once per
    file version (cached by path, size and mtime) and is what the loaded model reports."""
    from pipeline.config import ModelSpec
    from pipeline.models import load_model
    from pipeline.models.clip import TINY_CLIP, tiny_checkpoint
    from pipeline.models.identity import weights_identity
    from pipeline.rows import digest

    monkeypatch.setenv("MISALIGN_DIGEST_CACHE", str(tmp_path / "digests.json"))
    monkeypatch.setattr(digest, "_MEMO", {})
    ckpt = tmp_path / "clip.pt"
    shutil.copy(tiny_checkpoint(0), ckpt)
    params = _params(tmp_path)
    models = params.models
    models.preset = "paper"
    models.clip = ModelSpec(TINY_CLIP, "", str(ckpt))
    calls = []
    real_hash = digest._hash_file
    monkeypatch.setattr(digest, "_hash_file", lambda p: calls.append(p) or real_hash(p))
    first = weights_identity("clip", models, 0)
    assert len(calls) == 1
    monkeypatch.setattr(digest, "_MEMO", {})  # a new process: the digest comes from the file
    assert weights_identity("clip", models, 0) == first and len(calls) == 1
    loaded = load_model("clip", models, params.base)
    assert loaded.weights_id == first  # what the shards record is what was loaded

    step = EncodeStep(Path("i"), Path("c"), Path("o"), params.encode, 0.1, models, params.base, "t")
    key_before = step.params_hash()
    shutil.copy(tiny_checkpoint(1), ckpt)  # other weights, same path
    second = weights_identity("clip", models, 0)
    assert second != first and len(calls) == 2
    assert step.params_hash() != key_before
    assert json.loads(step.attrs()["weights"]) == {"clip": second}


def test_weights_copied_over_with_the_old_size_and_mtime_are_new_rows(small, tmp_path, monkeypatch):
    """`cp -p` / `rsync -t` / an archive: other weights at the same path, same size, the old
    mtime restored. The identity changes (inode or ctime), the loaded model is refused, and
    the rows are recomputed with the new weights."""
    import copy
    import os

    from pipeline.config import ModelSpec
    from pipeline.errors import ModelFileError
    from pipeline.extract.encode import run_encode
    from pipeline.extract.loaded import forget_loaded_models
    from pipeline.models.clip import TINY_CLIP, tiny_checkpoint
    from pipeline.models.identity import weights_identity
    from pipeline.rows import digest

    monkeypatch.setenv("MISALIGN_DIGEST_CACHE", str(tmp_path / "digests.json"))
    monkeypatch.setattr(digest, "_MEMO", {})
    cache = _copy(small, tmp_path)
    params = small[2]
    models = copy.deepcopy(params.models)
    models.preset = "paper"
    ckpt = tmp_path / "clip.pt"
    shutil.copy(tiny_checkpoint(0), ckpt)
    models.clip = ModelSpec(TINY_CLIP, "", str(ckpt))

    def encode() -> dict[str, np.ndarray]:
        run_encode(
            cache / "ingest",
            cache / "captions",
            cache / "objects",
            cache / "clip_local",
            cfg=params.encode,
            crop_padding=params.ground.crop_padding,
            models=models,
            base=params.base,
            dataset="t",
        )
        return store.read_shard(store.list_shards(cache / "clip_local")[0], ["image_emb"])

    first_id = weights_identity("clip", models, 0)
    before = encode()
    assert _n_processed(cache, "clip_local") == 6
    encode()
    assert _n_processed(cache, "clip_local") == 0

    old = ckpt.stat()
    new_weights = tiny_checkpoint(1)
    assert new_weights.stat().st_size == old.st_size
    shutil.copyfile(new_weights, ckpt)
    os.utime(ckpt, ns=(old.st_atime_ns, old.st_mtime_ns))
    now = ckpt.stat()
    assert (now.st_size, now.st_mtime_ns) == (old.st_size, old.st_mtime_ns)

    second_id = weights_identity("clip", models, 0)
    assert second_id != first_id
    with pytest.raises(ModelFileError, match="weights changed during the run"):
        encode()  # the model this process loaded before is not the file's any more
    forget_loaded_models()
    monkeypatch.setattr(digest, "_MEMO", {})  # a new process reads the remembered digests
    assert weights_identity("clip", models, 0) == second_id
    after = encode()
    assert _n_processed(cache, "clip_local") == 6
    assert not np.allclose(after["image_emb"], before["image_emb"])
    forget_loaded_models()


def test_hf_weights_in_a_local_folder_are_keyed_by_content(tmp_path, monkeypatch):
    from pipeline.models.hf import resolve_weights

    monkeypatch.setenv("MISALIGN_DIGEST_CACHE", str(tmp_path / "digests.json"))
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(folder / "model.safetensors"))
    a = resolve_weights("bert-base-uncased", folder, "bert").weights_id
    save_file({"w": np.ones(3, np.float32)}, str(folder / "model.safetensors"))
    b = resolve_weights("bert-base-uncased", folder, "bert").weights_id
    assert a != b and a.startswith("bert-base-uncased@sha256:")


def test_settings_differences_name_each_difference(small):
    from pipeline.features import feature_settings, settings_differences

    trained = feature_settings(small[0] / "cache" / "features")
    assert settings_differences(trained, trained) == []
    now = json.loads(json.dumps(trained))
    objects_version = STEP_VERSIONS["objects"]
    now["provenance"]["objects"]["step_version"] = objects_version + 1
    now["provenance"]["clip"]["model"] = "ViT-L-14/openai@sha256:ab"
    now["provenance"]["clip"]["device_class"] = "cuda"  # not a difference that matters
    assert settings_differences(trained, now) == [
        f"clip.model: trained with {trained['provenance']['clip']['model']!r}, these features "
        "'ViT-L-14/openai@sha256:ab'",
        f"objects.step_version: trained with {objects_version}, these features "
        f"{objects_version + 1}",
    ]


# ----------------------------------------------------------------------- batch-partner freedom


def test_grounding_boxes_do_not_depend_on_batch_partners():
    """Every box of an image is the same grounded alone or in a batch with images of other
    sizes and captions of other lengths."""
    from pipeline.models.grounding import GroundingDinoGrounder

    grounder = GroundingDinoGrounder.load(preset="tiny")
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (200, 100), (90, 160), (64, 48), (300, 300), (64, 48)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    captions = [
        "a cat",
        "a dog on a red table",
        "a man",
        "a green tree next to the street",
        "people",
        "a dog",
    ]
    kw = {"box_threshold": 0.05, "text_threshold": 0.05, "max_objects": 10}
    batched = grounder.ground(images, captions, **kw)
    n_boxes = 0
    for image, caption, together in zip(images, captions, batched):
        alone = grounder.ground([image], [caption], **kw)[0]
        assert [o.phrase for o in alone] == [o.phrase for o in together]
        for a, b in zip(alone, together):
            assert np.abs(np.subtract(a.box, b.box)).max() <= 1e-3
            n_boxes += 1
    assert n_boxes >= 10
    # The first and sixth image share size and token count: they do run in one batch.
    groups = grounder.partner_free_groups(images, [c.lower() + "." for c in captions])
    assert [0, 5] in groups and len(groups) == 5


def test_extracting_in_two_parts_equals_extracting_at_once(tmp_path):
    """20 images, then the dataset grown to 40, equals the 40 extracted at once: every caption,
    object, CLIP (and BERT, DINOv2, colour) and feature dataset, row by row."""
    rows = _fixture_rows(40)
    assert sum(1 for r in rows if not r["caption"]) >= 5  # BLIP-2 captions some of them
    params = _params(
        tmp_path,
        **{"encode.bert": True, "encode.dinov2": True, "encode.color_bins": 8},
    )
    parts = tmp_path / "parts"
    _dataset(parts / "data", rows[::2])  # every other image: the 20 interleave with the rest
    extract_dataset(parts / "data", parts / "cache", "t", params)
    _dataset(parts / "data", rows)
    extract_dataset(parts / "data", parts / "cache", "t", params)
    assert _n_processed(parts / "cache", "clip") == 20
    once = tmp_path / "once"
    _dataset(once / "data", rows)
    extract_dataset(once / "data", once / "cache", "t", params)
    n_objects = 0
    for stage in (*STAGES, "features"):
        a, b = _by_id(parts / "cache" / stage), _by_id(once / "cache" / stage)
        assert set(a) == set(b) and len(a) == 40
        for cid in a:
            assert set(a[cid]) == set(b[cid]), stage
            for key, value in a[cid].items():
                other = b[cid][key]
                if value.dtype == object:
                    assert list(value) == list(other), (stage, key)
                else:
                    assert value.shape == other.shape, (stage, key)
                    if value.size:
                        diff = np.abs(value.astype(np.float64) - other.astype(np.float64)).max()
                        assert diff <= 1e-6, (stage, key, diff)
            if stage == "objects":
                n_objects += len(a[cid]["obj_phrase"])
    assert n_objects >= 20  # boxes were compared, not just empty lists


KEY_NAMES = (
    "STEP_VERSIONS",
    "content_id",
    "decoding_hash",
    "matches",
    "params_hash",
    "reuse_index",
    "row_hash",
    "runtime_key",
)


def test_the_row_key_is_defined_in_one_module():
    """Every part of the row key is defined in pipeline/rows/key.py and nowhere else in the
    library (methods such as a step's `params_hash` only choose what they pass to it)."""
    import ast

    homes: dict[str, list[str]] = {name: [] for name in KEY_NAMES}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level: not methods
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if name in homes or name.lstrip("_") in homes:
                    homes[name.lstrip("_")].append(path.relative_to(ROOT).as_posix())
    assert homes == {name: ["pipeline/rows/key.py"] for name in KEY_NAMES}
    # The weights' identity and the runtime class are found by the models package (which
    # knows each model's files) and nowhere else; the key module composes them.
    for name in ("weights_identity", "runtime_class"):
        found = [
            path.relative_to(ROOT).as_posix()
            for path in sorted((ROOT / "pipeline").rglob("*.py"))
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name == name
        ]
        assert found == ["pipeline/models/identity.py"], (name, found)


def _update_golden(tmp: Path) -> None:
    data = _dataset(tmp / "data", _fixture_rows(6))
    params = _params(tmp)
    extract_dataset(data, tmp / "cache", "t", params)
    now = _digest(tmp / "cache")
    golden = {s: {"version": STEP_VERSIONS[s], "output": now[s]} for s in STAGES}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}")  # noqa: T201 (a developer command, not library code)


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_cache_key --update")
    with tempfile.TemporaryDirectory() as tmp:
        _update_golden(Path(tmp))
