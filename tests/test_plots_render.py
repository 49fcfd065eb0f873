"""The plots page of a real tiny run draws every panel with no console error.

`dvc repro evaluate` (the tiny preset, a few shipped sample images, every default head) writes
the ROC / PR / confusion CSVs exactly as a user's run does; `dvc plots show` turns them into the
offline page (plots_template/); headless Chromium opens it. A hook on `vegaEmbed` keeps each
plot's Vega view, so that every facet panel (one per head and revision) is checked to hold
drawn marks: a spec that fails at runtime leaves an empty panel and a console error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.browser import Chromium, require_chromium
from tests.helpers import ROOT, tiny_sample

# Before the page's scripts run: keep the result of every vegaEmbed call (the inlined
# vega-embed assigns the global, which goes through this setter).
HOOK = """
window.__views = []; window.__embedErrors = [];
(() => {
  let embed;
  Object.defineProperty(window, 'vegaEmbed', {
    configurable: true,
    set(value) { embed = value; },
    get() {
      return embed && ((el, spec, opts) => embed(el, spec, opts).then(
        (res) => { window.__views.push({id: String(el), view: res.view}); return res; },
        (err) => { window.__embedErrors.push(String(el) + ': ' + err); throw err; }));
    },
  });
})();
"""

# Per view: its facet panels (the items of the outermost group marks of role "scope" outside
# legends and axes; the whole view when there are none) and the number of drawn data items in
# each (descendant marks of role "mark": lines' points, cells, counts).
PANELS = """
Promise.all(window.__views.map(async ({id, view}) => {
  await view.runAsync();
  // marks hold items; a group item holds marks
  const drawn = (mark) => mark.marktype === 'group'
    ? mark.items.reduce((n, group) => n + (group.items || []).reduce((m, sub) => m + drawn(sub), 0), 0)
    : (mark.role === 'mark' ? mark.items.length : 0);
  const panels = [];
  const find = (mark) => {
    if (mark.marktype !== 'group' || /^(legend|axis|title)/.test(mark.role || '')) return;
    for (const group of mark.items) {
      if (mark.role === 'scope') panels.push((group.items || []).reduce((n, m) => n + drawn(m), 0));
      else (group.items || []).forEach(find);
    }
  };
  const root = view.scenegraph().root;
  find(root);
  return {id, panels: panels.length ? panels : [drawn(root)]};
}))
"""


# Per confusion-matrix count (text item): the WCAG contrast ratio of its colour with the colour
# of the cell (rect item) it sits in, colours normalised through a canvas context.
CONTRASTS = """
(() => {
  const ctx = document.createElement('canvas').getContext('2d');
  const rgb = (c) => { ctx.fillStyle = '#000'; ctx.fillStyle = c;
    const h = ctx.fillStyle; return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16) / 255); };
  const lum = (c) => rgb(c).map((v) => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
    .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p);
    return (x + 0.05) / (y + 0.05); };
  const out = [];
  const walk = (mark, rects) => {
    if (mark.marktype === 'group') {
      for (const group of mark.items) {
        const inner = (group.items || []).filter((m) => m.marktype === 'rect')
          .flatMap((m) => m.items);
        (group.items || []).forEach((m) => walk(m, inner.length ? inner : rects));
      }
    } else if (mark.marktype === 'text' && mark.role === 'mark') {
      for (const t of mark.items) {
        const cell = rects.find((r) => t.x >= r.x && t.x <= r.x + r.width
          && t.y >= r.y && t.y <= r.y + r.height);
        out.push({text: t.text, ratio: cell ? ratio(t.fill, cell.fill) : null});
      }
    }
  };
  window.__views.filter(({id}) => id.includes('confusion'))
    .forEach(({view}) => walk(view.scenegraph().root, []));
  return out;
})()
"""


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        PYTHONPATH=str(ROOT),
    )


def _dvc(repo: Path, *args: str, merged: bool = False) -> str:
    """DVC's stdout; with `merged`, stdout and stderr interleaved as a terminal shows them."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + (proc.stderr or "")[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str], str]:
    """A git+DVC copy of the project after `dvc repro evaluate` with the tiny preset."""
    repo = tmp_path_factory.mktemp("plotsrun")
    for item in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / item, repo / item)
    for folder in ("pipeline", "stages", "plots_template"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    tiny_sample(repo / "data" / "sample", per_generator=1, n_real=14)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["preset"] = "tiny"
    params["ingest"]["shard_size"] = 8
    params["train"]["mlp"]["epochs"] = 10
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = _dvc(repo, "repro", "evaluate", merged=True)
    return repo, list(params["train"]["heads"]), output


def _open(page: Path, profile: Path, n_plots: int) -> dict[str, Any]:
    """Load the page with every host unresolvable; return console errors and panels."""
    browser = Chromium(profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Page.addScriptToEvaluateOnNewDocument", {"source": HOOK}, session=session)
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")

        def evaluate(expression: str) -> Any:
            return browser.call(
                "Runtime.evaluate",
                {"expression": expression, "awaitPromise": True, "returnByValue": True},
                session=session,
            )["result"]["value"]

        settled = "window.__views.length + window.__embedErrors.length"
        deadline = time.monotonic() + 30
        while evaluate(settled) < n_plots and time.monotonic() < deadline:
            time.sleep(0.3)
        panels = evaluate(PANELS)
        embed_errors = evaluate("window.__embedErrors")
        contrasts = evaluate(CONTRASTS)
    finally:
        browser.close()
    errors = list(embed_errors)
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
    return {
        "errors": errors,
        "panels": {p["id"]: p["panels"] for p in panels},
        "contrasts": contrasts,
    }


def test_plots_page_of_a_tiny_run_draws_every_panel(run, tmp_path):
    repo, heads, _ = run
    _dvc(repo, "plots", "show", "-o", str(tmp_path / "out"))
    plots = json.loads(_dvc(repo, "plots", "show", "--json"))["data"]
    expected = sorted(f"plots/{c}/{h}.csv" for c in ("roc", "pr", "confusion") for h in heads)
    assert sorted(plots) == expected
    require_chromium()
    seen = _open(tmp_path / "out" / "index.html", tmp_path / "profile", len(plots))
    assert seen["errors"] == []
    assert len(seen["panels"]) == len(plots), seen
    empty = {plot: cells for plot, cells in seen["panels"].items() if not cells or 0 in cells}
    assert empty == {}, f"empty panels: {empty}"
    # every count readable on its cell (WCAG's 3:1 for large text; the template picks the
    # better of white and dark, at least about 4:1 on any colour)
    counts = seen["contrasts"]
    assert len(counts) >= 2 * len(heads), counts
    assert all(c["ratio"] is not None and c["ratio"] >= 3 for c in counts), counts


def test_pr_is_drawn_as_steps(run):
    """Precision is constant between two recalls (its points are thresholds): steps, with the
    precision of the higher recall (average precision's rectangles); ROC keeps straight lines."""
    repo, heads, _ = run
    plots = json.loads(_dvc(repo, "plots", "show", "--json"))["data"]
    pr = plots[f"plots/pr/{heads[0]}.csv"][0]["content"]["spec"]
    roc = plots[f"plots/roc/{heads[0]}.csv"][0]["content"]["spec"]
    assert pr["mark"]["interpolate"] == "step-before"
    assert roc["mark"].get("interpolate", "linear") == "linear"


def test_the_run_warns_about_the_tiny_preset_once_per_stage(run):
    """Every stage of the run loads its tiny models (and evaluate its five tiny heads), yet
    says once that they are random."""
    stages = re.split(r"Running stage '([^']+)'", run[2])[1:]
    warnings = {
        stage: sum("WARNING" in line and "RANDOM" in line for line in text.splitlines())
        for stage, text in zip(stages[::2], stages[1::2])
    }
    assert {"caption", "ground", "encode", "train", "evaluate"} <= set(warnings), warnings
    assert set(warnings.values()) == {1}, warnings
