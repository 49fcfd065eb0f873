"""No-op `dvc status` against the size of the dataset folder: the folder as a DVC dependency
(how ingest depended on data.path before) against the listing stage (what it depends on now).

Per size, two temp git+DVC repos hold `data/` with that many empty files. In one, stage
`folder_dep` depends on `data/` itself (DVC stats and looks up every file). In the other, as
in the project, stage `listed` depends on the listing stage's file (stages.listing,
`always_changed`) and `data/` is in .dvcignore (the project's ignores `/data/`), so DVC does
not walk it while collecting stages. After one `dvc repro`, each round times `dvc status` in
both (CPU seconds of the DVC process and its children), alternated, and the listing's own
cost as a no-op `dvc repro` (the listing runs, nothing after it). Sizes run in one
invocation, printed side by side.

    python bench/bench_dvc_status.py [--sizes 1000 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

FOLDER_DEP = {
    "stages": {
        "folder_dep": {
            "cmd": "echo done > folder_dep.txt",
            "deps": ["data"],
            "outs": ["folder_dep.txt"],
        }
    }
}
LISTED = {
    "stages": {
        "listing": {
            "cmd": f"{sys.executable} -m stages.listing --data data --out listing.jsonl",
            "always_changed": True,
            "outs": [{"listing.jsonl": {"cache": False}}],
        },
        "listed": {
            "cmd": "cp listing.jsonl listed.txt",
            "deps": ["listing.jsonl"],
            "outs": ["listed.txt"],
        },
    }
}


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        PYTHONPATH=str(ROOT),
    )


def _dvc(repo: Path, *args: str) -> tuple[float, float, str]:
    """(CPU seconds, wall seconds, output) of one DVC command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=_env(), capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, proc.stdout + proc.stderr


def make_repo(where: Path, n: int, variant: str) -> Path:
    repo = where / f"{variant}_{n}"
    data = repo / "data"
    per_folder = 1000
    for k in range(n):
        folder = data / f"d{k // per_folder:04d}"
        if k % per_folder == 0:
            folder.mkdir(parents=True)
        (folder / f"img_{k:07d}.png").touch()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["path"] = "data"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = FOLDER_DEP if variant == "folder_dep" else LISTED
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    if variant == "listed":
        shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    _dvc(repo, "repro", "-q")
    return repo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_dvc_status_") as tmp:
        repos = {
            n: {v: make_repo(Path(tmp), n, v) for v in ("folder_dep", "listed")} for n in args.sizes
        }
        for n in args.sizes:
            rows[n] = {"folder_dep": [], "listed": [], "repro_listed": []}
        for _ in range(args.rounds):
            for n, repo in repos.items():
                cpu, _, out = _dvc(repo["folder_dep"], "status")
                assert "changed" not in out, out
                rows[n]["folder_dep"].append(cpu)
                cpu, _, out = _dvc(repo["listed"], "status")
                assert "listed:" not in out, out  # only the listing stage is "always changed"
                rows[n]["listed"].append(cpu)
                cpu, _, out = _dvc(repo["listed"], "repro")
                assert "Running stage 'listed'" not in out, out
                rows[n]["repro_listed"].append(cpu)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rows.items()}
    small = min(args.sizes)
    print(f"no-op DVC commands, CPU seconds (median of {args.rounds}, alternated)")
    print(f"{'files':>8} {'status, folder dep':>18} {'status, listing':>16} {'repro, listing':>15}")
    for n in args.sizes:
        m = med[n]
        print(f"{n:>8} {m['folder_dep']:>18.2f} {m['listed']:>16.2f} {m['repro_listed']:>15.2f}")
    for n in args.sizes:
        if n != small:
            ratio = {k: med[n][k] / med[small][k] for k in ("folder_dep", "listed", "repro_listed")}
            print(
                f"{n} vs {small} files: folder dep {ratio['folder_dep']:.2f}x, listing status "
                f"{ratio['listed']:.2f}x, listing repro {ratio['repro_listed']:.2f}x"
            )


if __name__ == "__main__":
    main()
