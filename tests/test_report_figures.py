"""The report's figures: each titled with the models preset, curve legends off the curves, long
words wrapped in gallery cards, and the QF matrix file's provenance keys accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure

import pipeline.report.figures as report_module
from tests.report_run import build, make_run


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Figure], str]:
    """Every figure a tiny run's report draws (caught on their way to PNG), and its HTML."""
    root = tmp_path_factory.mktemp("figures")
    dirs = make_run(root, preset="tiny")
    qf_path = dirs["metrics"] / "qf_matrix.json"
    made_by = {"preset": "tiny", "models": {"clip": "tiny-clip"}}
    qf = {head: {**made_by, **grid} for head, grid in json.loads(qf_path.read_text()).items()}
    qf_path.write_text(json.dumps(qf))  # as the qf_matrix stage writes it
    drawn: list[Figure] = []
    original = report_module._png_uri

    def keep(fig: Figure) -> str:
        drawn.append(fig)
        return original(fig)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module, "_png_uri", keep)
        html = build(dirs, root / "report").read_text(encoding="utf-8")
    return drawn, html


def test_every_figure_is_titled_with_the_preset(figures: tuple[list[Figure], str]) -> None:
    drawn, html = figures
    titles = [fig.get_suptitle() for fig in drawn]
    # curves, a confusion matrix, noise and jpeg robustness, a QF matrix per head, t-SNE
    assert len(drawn) >= 6, titles
    assert all(t.startswith("models.preset=tiny: RANDOM") for t in titles), titles
    assert "no train-QF" not in html and "QF matrix" in html


def test_curve_legends_do_not_cover_the_curves(figures: tuple[list[Figure], str]) -> None:
    drawn, _ = figures
    (curves,) = [f for f in drawn if any(ax.get_title() == "ROC (AUC)" for ax in f.axes)]
    curves.canvas.draw()
    renderer: Any = curves.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in curves.axes:
        legend = ax.get_legend()
        assert legend is not None
        box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not box.overlaps(area), (ax.get_title(), box, area)


def test_long_words_wrap_in_gallery_cards(figures: tuple[list[Figure], str]) -> None:
    _, html = figures
    card = html[html.index(".card{") :]
    card = card[: card.index("}")]
    assert "overflow-wrap:anywhere" in card and "min-width:0" in card


def test_qf_section_reads_the_provenance_keys(tmp_path: Path) -> None:
    path = tmp_path / "qf_matrix.json"
    cell = {"acc": 0.9, "ap": 0.95, "auc": 0.97, "n": 10}
    path.write_text(
        json.dumps({"svm": {"preset": "paper", "models": {"clip": "x"}, "40": {"40": cell}}})
    )
    html = report_module.qf_section(path, "paper")
    assert "<h3>svm</h3>" in html and "preset" not in html.split("<h3>svm</h3>")[1][:50]
