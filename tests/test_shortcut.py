"""Shortcut audit: a metadata-only baseline flags a dataset whose reals are JPEG and fakes PNG,
and stays quiet on the same pictures saved in one format."""

import json

import numpy as np
from PIL import Image

from pipeline.config import BaseConfig, EvaluateConfig, IngestConfig
from pipeline.data.ingest import run_ingest
from pipeline.evaluation.shortcut import COLUMNS, image_metadata, jpeg_quality, shortcut_audit
from tests.helpers import write_manifest

N = 120


def pictures(seed=0):
    """Pictures of one distribution for both classes: random sizes, smooth content, noise of
    a random strength (so file sizes vary as much within a class as between)."""
    rng = np.random.default_rng(seed)
    for i in range(N):
        h, w = [(64, 64), (64, 96), (96, 64)][rng.integers(3)]
        yy, xx = np.mgrid[0:h, 0:w] / 64.0
        base = np.stack([np.sin(xx * rng.uniform(1, 6) + c) for c in range(3)], -1) * 80 + 128
        noisy = base + rng.normal(0, rng.uniform(2, 40), base.shape)
        yield i, Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def dataset(root, fmt_of):
    """Write the pictures (even: real, odd: generated) in the format `fmt_of(label)` picks."""
    rows = []
    for i, picture in pictures():
        label = i % 2
        fmt = fmt_of(label)
        name = f"images/{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        (root / "images").mkdir(parents=True, exist_ok=True)
        picture.save(root / name, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        rows.append(
            {
                "file": name,
                "label": "fake" if label else "real",
                "generator": "gen" if label else "real",
                "split": ["train", "test"][i // 2 % 2],
            }
        )
    write_manifest(root / "manifest.csv", rows)
    out = root / "ingest"
    run_ingest(root / "manifest.csv", out, cfg=IngestConfig(), base=BaseConfig(), dataset="t")
    return out


def test_flags_jpeg_reals_against_png_fakes(tmp_path):
    ingest = dataset(tmp_path / "planted", lambda label: "PNG" if label else "JPEG")
    audit = shortcut_audit(ingest, head_auc={"mlp": 0.97})
    assert audit["metadata_baseline"]["auc"] >= 0.95
    assert audit["warning"] and audit["message"].startswith("SHORTCUT")
    assert audit["heads"] == {"mlp": 0.97}


def test_quiet_on_the_same_pictures_in_one_format(tmp_path):
    for fmt in ("PNG", "JPEG"):
        ingest = dataset(tmp_path / fmt, lambda label, f=fmt: f)
        audit = shortcut_audit(ingest)
        assert audit["metadata_baseline"]["auc"] < 0.9, fmt
        assert not audit["warning"]


def test_metadata_columns_and_jpeg_quality(tmp_path):
    picture = next(pictures())[1]
    for q in (30, 75, 95):
        picture.save(tmp_path / f"q{q}.jpg", quality=q)
        row = dict(zip(COLUMNS, image_metadata(tmp_path / f"q{q}.jpg")))
        assert abs(row["jpeg_quality"] - q) <= 1
        assert row["format_jpeg"] == 1 and row["exif"] == 0
    picture.save(tmp_path / "p.png")
    row = dict(zip(COLUMNS, image_metadata(tmp_path / "p.png")))
    assert row["format_png"] == 1 and row["jpeg_quality"] == 100
    assert row["width"] == picture.width and row["height"] == picture.height
    assert row["bytes_per_pixel"] == (tmp_path / "p.png").stat().st_size / (
        picture.width * picture.height
    )
    exif = Image.Exif()
    exif[0x010F] = "camera"
    picture.save(tmp_path / "e.jpg", exif=exif)
    assert dict(zip(COLUMNS, image_metadata(tmp_path / "e.jpg")))["exif"] == 1
    assert jpeg_quality(None) == 100


def test_evaluate_writes_the_audit_beside_every_head_and_the_report_warns(tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.evaluation.evaluate import run_evaluate
    from pipeline.report.build import build_report
    from pipeline.train import train_heads
    from tests.helpers import write_features

    ingest = dataset(tmp_path / "planted", lambda label: "PNG" if label else "JPEG")
    feats = write_features(tmp_path / "features", n=60)
    train_heads(feats, tmp_path / "models", cfg=TrainConfig(heads=["svm"]), kind="item", seed=0)
    metrics = run_evaluate(
        feats,
        tmp_path / "models",
        tmp_path / "metrics" / "eval.json",
        tmp_path / "scores",
        tmp_path / "plots",
        cfg=EvaluateConfig(),
        summary_dir=tmp_path / "metrics" / "summary",
        ingest_dir=ingest,
        shortcut_path=tmp_path / "metrics" / "shortcut.json",
    )
    audit = json.loads((tmp_path / "metrics" / "shortcut.json").read_text())
    assert audit["warning"] and set(audit["heads"]) == {"svm"}
    assert metrics["svm"]["metadata_baseline_auc"] == audit["metadata_baseline"]["auc"] >= 0.95
    summary = json.loads((tmp_path / "metrics" / "summary" / "svm.json").read_text())
    assert summary["metadata_auc"] >= 0.95
    missing = tmp_path / "none"
    html = build_report(
        tmp_path / "report",
        metrics_dir=tmp_path / "metrics",
        scores_dir=tmp_path / "scores",
        features_dir=feats,
        ingest_dir=missing,
        captions_dir=missing,
        objects_dir=missing,
        n_gallery=0,
    ).read_text()
    assert 'id="shortcut-banner"' in html and "SHORTCUT: file metadata alone" in html


def test_missing_images_leave_a_note_not_a_failure(tmp_path):
    import shutil

    ingest = dataset(tmp_path / "gone", lambda label: "PNG")
    shutil.rmtree(tmp_path / "gone" / "images")
    audit = shortcut_audit(ingest)
    assert audit["metadata_baseline"] is None and not audit["warning"]
    assert audit["n_unreadable"] == N and "can be read" in audit["message"]
