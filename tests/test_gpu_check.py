"""bench/gpu_check.py runs end to end on the CPU in --dry-run mode and writes its figures."""

from __future__ import annotations

import importlib.util
import json

from tests.helpers import ROOT


def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--n-images", "3"]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    assert report["clip_bare"]["float32"]["images_per_second"] > 0
    pipe = report["clip_pipeline"]
    assert pipe["stage_timings"]["n_processed"] == 3 and pipe["images_per_second"] > 0
    assert report["clip_pipeline_over_bare"] > 0
    # base.decode: gpu on the CPU: the stage runs, decoding on the CPU.
    gpu_decode = report["clip_pipeline_gpu_decode"]
    assert gpu_decode["decoder"] == "pil" and gpu_decode["stage_timings"]["n_processed"] == 3
    for kind in ("grounding_dino", "blip2"):
        assert report[kind]["images_per_second"] > 0, report[kind]
        assert report[kind]["n_parameters"] > 0
