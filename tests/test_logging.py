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
