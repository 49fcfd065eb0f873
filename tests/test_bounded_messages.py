"""Values in error messages are cut to a bounded length, computed without walking the value:
a YAML "billion laughs" in a string param is refused in seconds with little memory."""

import json
import subprocess
import sys

import pytest

from pipeline.errors import SHOWN_MAX, shown
from tests.helpers import ROOT


def test_shown_is_short_for_huge_or_deep_values():
    nested: list = ["lol"] * 9
    for _ in range(12):
        nested = [nested] * 9  # 9**13 leaves if walked
    for value in (nested, "x" * 10**6, 10**4000, {str(i): i for i in range(10**5)}):
        assert len(shown(value)) <= SHOWN_MAX
    assert shown("a cat") == "'a cat'" and shown(3) == "3"


def bomb_params(tmp_path, key: str):
    """params.yaml with a billion laughs (9 levels of 9 aliases) as the value of `key`."""
    levels = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        levels.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    section, name = key.split(".")
    lines = (ROOT / "params.yaml").read_text().splitlines()
    start = lines.index(f"{section}:")
    at = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(f"{name}:"))
    lines[at] = f"  {name}: {{{', '.join(levels)}}}"
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# Run by a fresh, small Python: Linux keeps a process's peak RSS across fork and exec, so the
# check stage is started from it (not from pytest, whose own peak it would inherit) and its
# peak read as this process's RUSAGE_CHILDREN.
_RUN_CHECK = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
cmd = [sys.executable, "-m", "stages.check", "--params", sys.argv[1], "--out", sys.argv[2]]
proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
sys.stderr.write(proc.stderr)
print(json.dumps(
    {"status": proc.returncode, "seconds": time.perf_counter() - start, "peak_mb": peak_mb}
))
"""


@pytest.mark.parametrize("key", ["caption.prompt", "data.name"])
def test_a_yaml_billion_laughs_is_refused_fast_with_little_memory(tmp_path, key):
    params = bomb_params(tmp_path, key)
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_CHECK, str(params), str(tmp_path / "stamp")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert result["status"] == 1 and len(errors) == 1 and key in errors[0], proc.stderr
    assert len(errors[0]) < 600
    assert result["seconds"] <= 5 and result["peak_mb"] <= 300, result
    assert not (tmp_path / "stamp").exists()
