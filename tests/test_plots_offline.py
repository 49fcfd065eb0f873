"""`dvc plots show` with the project's .dvc/config and dvc.yaml draws the curves offline: the
page inlines vega (plots_template/), and headless Chromium with no network paints them."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.evaluation.evaluate import _write_points
from pipeline.evaluation.metrics import pr_points, roc_points
from tests.browser import Chromium, require_chromium
from tests.helpers import ROOT

HEADS = {"mlp": 2.0, "svm": 0.5}  # head -> class separation of its made-up scores


def _dvc(repo: Path, *args: str) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _plots_page(tmp: Path, with_project_config: bool) -> Path:
    """`dvc plots show` in a repo holding the project's dvc.yaml, params.yaml, plots_template/
    (the plots' templates) and, when asked, .dvc/config (which sets the offline page), with
    ROC / PR / confusion data of two heads."""
    repo = tmp / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "plots_template", repo / "plots_template")
    if with_project_config:
        shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    for head, sep in HEADS.items():
        p = 1 / (1 + np.exp(-(rng.normal(size=100) + sep * (2 * y - 1))))
        pred = np.where(p > 0.5, "generated", "real")
        truth = np.where(y == 1, "generated", "real")
        confusion = [{"actual": a, "predicted": b} for a, b in zip(truth, pred)]
        for sub, points in (
            ("roc", roc_points(y, p)),
            ("pr", pr_points(y, p)),
            ("confusion", confusion),
        ):
            _write_points(repo / "plots" / sub / f"{head}.csv", points)  # as evaluate writes
    _dvc(repo, "plots", "show", "-o", "out")
    return repo / "out" / "index.html"


def _screenshot(page: Path, profile: Path) -> tuple[Image.Image, list[str], int]:
    """Open `page` with every host unresolvable; wait for vega to paint; return a screenshot,
    the URLs the page requested and the number of drawn plots (canvas/svg elements)."""
    browser = Chromium(profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime"):
            browser.call(f"{domain}.enable", session=session)
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        url = page.resolve().as_uri()
        browser.call("Page.navigate", {"url": url}, session=session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
        count = "document.querySelectorAll('canvas, svg.marks').length"
        drawn, deadline = 0, time.monotonic() + 20
        while time.monotonic() < deadline:
            drawn = browser.call(
                "Runtime.evaluate", {"expression": count, "returnByValue": True}, session=session
            )["result"]["value"]
            if drawn >= 3:
                break
            time.sleep(0.3)
        time.sleep(0.5)  # let the last canvas finish painting
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
    finally:
        browser.close()
    requests = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e.get("method") == "Network.requestWillBeSent"
        and e["params"]["request"]["url"] not in (url,)
        and not e["params"]["request"]["url"].startswith("data:")
    ]
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    return image, requests, int(drawn)


def _coloured_fraction(image: Image.Image) -> float:
    """Share of pixels that are clearly coloured (curve lines, confusion cells), not grey."""
    a = np.asarray(image).astype(int)
    return float(((a.max(axis=2) - a.min(axis=2)) > 60).mean())


def test_plots_render_offline_with_the_project_template(tmp_path):
    page = _plots_page(tmp_path, with_project_config=True)
    html = page.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html), "no <script src>: everything inline"
    assert "vegaEmbed" in html and "models.preset=paper" in html  # titles name the preset
    require_chromium()
    image, requests, drawn = _screenshot(page, tmp_path / "profile")
    image.save(tmp_path / "plots.png")
    assert requests == []
    assert drawn >= 3  # ROC, PR, confusion
    assert _coloured_fraction(image) > 0.002, "the page is blank: no curve was drawn"


def test_each_plot_names_its_curve_and_its_head(tmp_path):
    """Every plot of the page says which curve of which head it is: the title the curve (from
    dvc.yaml), the header the head (the project's templates read the CSVs' `head` column)."""
    page = _plots_page(tmp_path, with_project_config=True)
    plots = json.loads(_dvc(page.parent.parent, "plots", "show", "--json"))["data"]
    titles = {
        "roc": ("ROC curve", "false positive rate", "true positive rate"),
        "pr": ("Precision-recall curve", "recall", "precision"),
        "confusion": ("Confusion matrix", "predicted class", "actual class"),
    }
    assert sorted(plots) == sorted(f"plots/{c}/{h}.csv" for c in titles for h in HEADS)
    for path, (plot,) in plots.items():
        curve, head = path.split("/")[1], Path(path).stem
        title, x_label, y_label = titles[curve]
        spec = plot["content"]
        assert spec["title"]["text"].startswith(f"{title}, test split, models.preset=")
        assert {row["head"] for row in spec["data"]["values"]} == {head}
        header = spec["facet"]["column"]["field"]
        label = {t["as"]: t["calculate"] for t in spec["transform"]}[header]
        assert label.startswith("'head ' + datum.head"), label
        axes = spec["spec"]["encoding"]
        assert (axes["x"]["title"], axes["y"]["title"]) == (x_label, y_label)


def test_without_the_template_the_page_needs_the_network(tmp_path):
    """The check can fail: DVC's own page asks a CDN for vega and paints nothing offline."""
    page = _plots_page(tmp_path, with_project_config=False)
    assert re.search(r"<script[^>]*\bsrc=\"https://", page.read_text())
    require_chromium()
    image, requests, drawn = _screenshot(page, tmp_path / "profile")
    assert drawn == 0 and any("vega" in r for r in requests)
    assert _coloured_fraction(image) < 0.0005
