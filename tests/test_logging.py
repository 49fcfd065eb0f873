"""Stages and the CLI log this project's INFO lines, and only warnings from other libraries."""

import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = """
import logging, os
from pipeline.cli import setup_logging
setup_logging()
logging.info("root info: open_clip logs like this")
logging.getLogger("open_clip").info("library info")
logging.getLogger("pipeline.extract").info("project info")
logging.getLogger("transformers").warning("library warning")
print(os.environ["HF_HUB_DISABLE_PROGRESS_BARS"], os.environ["TRANSFORMERS_VERBOSITY"])
"""


def test_library_info_lines_are_silenced_and_project_lines_kept():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "project info" in proc.stderr and "library warning" in proc.stderr
    assert "root info" not in proc.stderr and "library info" not in proc.stderr
    assert proc.stdout.split() == ["1", "error"]  # no loading bars from transformers / hub


TINY_STAGE = """
import subprocess, sys
from pipeline.models.hf import warn_tiny
from pipeline.provenance import warn_if_tiny
from stages._common import parser, run

WORKER = (
    "from pipeline.logs import setup_logging; setup_logging(); "
    "from pipeline.models.hf import warn_tiny; warn_tiny('tiny-clip', 0)"
)

def body(args, params):
    warn_tiny("tiny-blip2", 0)  # each model load of the stage
    warn_tiny("tiny-grounding-dino", 0)
    warn_if_tiny({"preset": "tiny"}, "head models/mlp")  # each tiny head it scores
    subprocess.run([sys.executable, "-c", WORKER], check=True)  # a worker process it starts

code = run("encode", ["--params", sys.argv[1]], parser("a stage"), body)
print("STAGE DONE", flush=True)
warn_tiny("tiny-blip2", 0)  # outside a stage run, a tiny model load warns again
sys.exit(code)
"""


def test_a_stage_run_warns_about_the_tiny_preset_once(tmp_path):
    """One warning per stage run, however many tiny models and heads it loads (in its own
    process or in workers it starts); model loads outside a stage still warn."""
    params = (ROOT / "params.yaml").read_text().replace("preset: paper", "preset: tiny", 1)
    assert "preset: tiny" in params
    (tmp_path / "params.yaml").write_text(params)
    proc = subprocess.run(
        [sys.executable, "-c", TINY_STAGE, str(tmp_path / "params.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line and "RANDOM" in line]
    assert len(warnings) == 2, proc.stderr
    assert "encode: models.preset=tiny: every model is small and RANDOM" in warnings[0]
    assert "'tiny-blip2' has RANDOM weights" in warnings[1]  # after the stage, by itself


def test_progress_shows_an_eta_only_once_the_rate_is_known():
    """60 s of warm-up (models loading) before the first image, then 1 image/s: no ETA while
    warming up, then the ETA of 1 image/s (90 s for 90 images), not of 10 images in 70 s."""
    import io

    from pipeline.logs import progress

    now = [1000.0]
    out = io.StringIO()
    bar = progress(total=100, file=out, mininterval=0, miniters=1, desc="clip", unit="img")
    bar._time = lambda: now[0]  # tqdm's clock, made a step clock
    bar.start_t = bar.last_print_t = now[0]
    now[0] += 60
    bar.update(1)
    warm_up = out.getvalue().replace("\r", "\n").strip().splitlines()
    for _ in range(9):
        now[0] += 1
        bar.update(1)
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    bar.close()
    assert all("warming up" in line and "<?" in line for line in warm_up), warm_up
    assert "10/100 [01:09<01:30,  1.00img/s]" in last, last

    out = io.StringIO()  # an iterable of unknown length: no ETA anyway, and no error
    assert list(progress(iter(range(3)), file=out, mininterval=0, desc="ingest")) == [0, 1, 2]
    assert "3it" in out.getvalue()
