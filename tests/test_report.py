"""The HTML report: sections, embedded images, escaping, the tiny banner, and a headless browser."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.report import build_report
from pipeline.rows import store
from tests.browser import Chromium, render, require_chromium
from tests.report_run import EVIL_CAPTION, build, make_run

SECTIONS = ("run", "summary", "shortcut", "curves", "robustness", "qf-matrix", "tsne", "gallery")


class _Page(HTMLParser):
    """Image sources, section ids and the text of each section of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.sections: dict[str, str] = {}
        self.notes: dict[str, list[str]] = {}
        self.tags: set[str] = set()
        self._section: str | None = None
        self._in_note = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "section":
            self._section = a["id"]
            self.sections[self._section or ""] = ""
        self._in_note = tag == "p" and a.get("class") == "note"

    def handle_data(self, data: str) -> None:
        if self._section is not None:
            self.sections[self._section] += data
            if self._in_note:
                self.notes.setdefault(self._section, []).append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("run")
    dirs = make_run(root)
    return build(dirs, root / "report"), dirs


def test_report_has_every_section_with_content(report: tuple[Path, dict[str, Path]]) -> None:
    path, dirs = report
    assert path == dirs["metrics"].parent / "report" / "index.html" and path.is_file()
    page = parse(path)
    assert tuple(page.sections) == SECTIONS
    assert page.notes == {}, "no section should be skipped when every input is present"
    metrics = json.loads((dirs["metrics"] / "eval.json").read_text())
    acc = metrics["mlp"]["overall"]["acc"]
    assert f"{100 * acc:.1f}%" in page.sections["summary"]
    for generator in ("sd14", "midjourney", "dalle2"):
        assert generator in page.sections["summary"]
    assert "Per generator: multitask" in page.sections["summary"]
    assert "other_ds" in page.sections["summary"]  # a non-perturbation evaluation set
    assert "Attribution confusion matrix: multitask" in page.sections["curves"]
    assert "confusion matrix: mlp" not in page.sections["curves"]  # no pred_class
    # Robustness: clean first, then increasing damage (JPEG quality decreasing).
    text = page.sections["robustness"]
    assert re.search(r"clean\s*σ 0\.005", text) and re.search(r"clean\s*q 75\s*q 50", text)
    html = path.read_text(encoding="utf-8")
    assert "<h3>noise</h3>" in html and "<h3>jpeg</h3>" in html
    assert "<h3>blur</h3>" not in html  # no blur files, no blur block
    assert "perplexity 3.7" in page.sections["tsne"]  # (12 - 1) / 3
    assert page.sections["gallery"].count("caption source: dataset") == 12


def test_every_image_is_an_embedded_valid_picture(report: tuple[Path, dict[str, Path]]) -> None:
    path, _ = report
    page = parse(path)
    # curves 1 + confusion 1 + robustness 2 kinds + QF 2 heads + t-SNE 1 + gallery 12
    assert len(page.images) == 19
    for src in page.images:
        match = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
        assert match, src[:60]
        with Image.open(io.BytesIO(base64.b64decode(match[2], validate=True))) as img:
            assert img.format.lower() == match[1]
            img.load()
            assert min(img.size) > 10
    html = path.read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not re.search(r"(src|href)=\"(?!data:|#)", html), "only data: URIs and #anchors"
    assert "http://" not in html and "https://" not in html


def test_user_and_model_text_is_escaped(report: tuple[Path, dict[str, Path]]) -> None:
    path, _ = report
    html = path.read_text(encoding="utf-8")
    assert EVIL_CAPTION not in html and "<b>café" not in html
    assert "&lt;script&gt;alert(&quot;caption&quot;)&lt;/script&gt; a dog &amp; a" in html
    assert "&lt;b&gt;café ☕&lt;/b&gt;" in html
    assert parse(path).sections["gallery"].count(EVIL_CAPTION) == 1  # shown, as text


def test_tiny_preset_shows_a_banner_and_other_presets_do_not(
    report: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    html = report[0].read_text(encoding="utf-8")
    assert 'id="tiny-banner"' in html and "MEANINGLESS" in html
    dirs = make_run(tmp_path, preset="paper", n_images=4)
    html = build(dirs, tmp_path / "report").read_text(encoding="utf-8")
    assert 'id="tiny-banner"' not in html and "MEANINGLESS" not in html
    run = parse(tmp_path / "report" / "index.html").sections["run"]
    assert "paper" in run and "encode" in run and "tiny-clip" in run  # the Run table's encode row


CJK_PHRASE = "黑猫 on a 桌子"


def _covers(text: str) -> bool:
    """Whether an installed label font (as matplotlib's font manager lists them) covers `text`."""
    from pipeline.report.gallery import _label_fonts

    return any({ord(c) for c in text if not c.isspace()} <= cps for _, cps in _label_fonts())


def test_thumbnail_labels_never_draw_tofu():
    """A phrase is drawn when an installed font covers it, else as the object's number; what is
    drawn is always covered by the font drawing it. (This machine has no CJK font.)"""
    from pipeline.report.gallery import _box_label, _label_fonts

    assert _box_label(0, "a cat", 0.5)[1:] == ("a cat 0.50", False)
    label = _box_label(2, CJK_PHRASE, 0.524)
    if _covers(CJK_PHRASE):
        assert label[1:] == (f"{CJK_PHRASE} 0.52", False)
    else:
        assert label[1:] == ("#3 0.52", True)
    assert _covers(label.text) or not _label_fonts()


def test_cjk_phrase_without_a_cjk_font_is_html_text_and_no_glyph_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    # grounding scores as labels (features without per-object misalignment)
    dirs = make_run(tmp_path, n_images=4, first_phrase=CJK_PHRASE, explained=False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        path = build(dirs, tmp_path / "report")
    glyph = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in glyph if "glyph" in m.lower()], glyph
    gallery = parse(path).sections["gallery"]
    assert f"{CJK_PHRASE} (0.30)" in gallery  # the original text, in the browser's fonts
    drawn_as_number = "(drawn as “#1 0.30”: no installed font has its characters)" in gallery
    assert drawn_as_number != _covers(CJK_PHRASE)
    assert "thing 1 (0.50)" in gallery and "drawn as “#2" not in gallery


def test_absent_inputs_leave_a_note_per_section(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    path = build_report(
        tmp_path / "report",
        metrics_dir=missing,
        scores_dir=missing,
        features_dir=missing,
        ingest_dir=missing,
        captions_dir=missing,
        objects_dir=missing,
    )
    page = parse(path)
    assert tuple(page.sections) == SECTIONS
    assert set(page.notes) == set(SECTIONS)
    assert page.images == []
    assert "eval.json" in " ".join(page.notes["summary"])
    assert "features stage" in " ".join(page.notes["tsne"])


def test_small_runs_skip_tsne_and_gallery_shows_missing_files(tmp_path: Path) -> None:
    dirs = make_run(tmp_path, n_images=4)
    (tmp_path / "data" / "real" / "img_2.png").unlink()
    page = parse(build(dirs, tmp_path / "report"))
    assert "at least 5 images" in " ".join(page.notes["tsne"])
    assert "cannot open" in page.sections["gallery"] and "img_2.png" in page.sections["gallery"]
    assert sum(src.startswith("data:image/jpeg") for src in page.images) == 3


def test_report_is_repeatable_byte_for_byte(
    report: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    path, dirs = report
    again = build(dirs, tmp_path / "again")
    assert again.read_bytes() == path.read_bytes(), "same inputs and seed, same report"


def test_gallery_is_seeded_mixed_and_prefers_test(tmp_path: Path) -> None:
    dirs = make_run(tmp_path)
    # Only the gallery's inputs: the other sections are skipped, which keeps this test fast.
    dirs |= {
        "metrics": tmp_path / "none",
        "scores": tmp_path / "none",
        "features": tmp_path / "none",
    }
    galleries = {}
    for seed in range(4):
        html = build(dirs, tmp_path / f"seed{seed}", n_gallery=4, seed=seed).read_text()
        galleries[seed] = html[html.index('<section id="gallery">') :]
    gallery = galleries[0]
    assert gallery.count('class="tag real"') == 2 and gallery.count('class="tag generated"') == 2
    assert gallery.count("split test") == 4
    # The two generated test images come from two different generators.
    assert len(set(re.findall(r"generated · (\w+)", gallery))) == 2
    picked = {tuple(re.findall(r"img_\d+\.png", g)) for g in galleries.values()}
    assert len(picked) > 1, "the seed changes the choice"
    assert all(len(set(p)) == 4 for p in picked)


def test_malformed_metrics_name_the_file(tmp_path: Path) -> None:
    dirs = make_run(tmp_path, n_images=4)
    (dirs["metrics"] / "eval.json").write_text('{"mlp": [1, 2]}')
    with pytest.raises(ValueError, match=r"eval\.json is not an evaluate-stage metrics file"):
        build(dirs, tmp_path / "report")
    (dirs["metrics"] / "eval.json").write_text("{")
    with pytest.raises(ValueError, match=r"eval\.json is not valid JSON"):
        build(dirs, tmp_path / "report")


# ------------------------------------------------------------------------- headless Chromium


def test_report_renders_offline_in_headless_chromium(
    report: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """The report opens in a real browser with no console error, no broken image and no request
    for anything outside the file (DevTools protocol over a pipe; see `render`)."""
    require_chromium()
    seen = render(report[0], tmp_path / "profile")
    assert seen == {"n_images": 19, "broken": [], "errors": [], "requests": []}


def test_browser_check_catches_broken_pages(tmp_path: Path) -> None:
    """The browser check can fail: a bad image, a script error and an external image are seen."""
    require_chromium()
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img alt="corrupt" src="data:image/png;base64,AAAA">'
        '<img alt="remote" src="http://example.invalid/x.png">'
        "<script>console.error('boom')</script></body></html>"
    )
    seen = render(bad, tmp_path / "profile")
    assert seen["n_images"] == 2 and sorted(seen["broken"]) == ["corrupt", "remote"]
    assert "boom" in seen["errors"]
    assert seen["requests"] == ["http://example.invalid/x.png"]


def _gallery_objects(page: Path, profile: Path) -> list[dict[str, Any]]:
    """Per gallery card, as a browser shows it: its text and each listed object's
    misalignment, swatch colour and text."""
    script = """[...document.querySelectorAll('.card')].map(card => ({
        text: card.innerText,
        objects: [...card.querySelectorAll('ol.objects li')].map(li => ({
            misalign: li.dataset.misalign === undefined ? null : Number(li.dataset.misalign),
            colour: li.querySelector('.swatch') ?
                getComputedStyle(li.querySelector('.swatch')).backgroundColor : null,
            text: li.innerText}))}))"""
    browser = Chromium(profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        browser.call("Page.enable", session=session)
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
        value = browser.call(
            "Runtime.evaluate", {"expression": script, "returnByValue": True}, session=session
        )["result"]["value"]
    finally:
        browser.close()
    return list(value)


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[k : k + 2], 16) for k in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def test_gallery_lists_objects_by_misalignment_in_a_browser(
    report: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """Each card lists its objects from the most misaligned, with the features shards' scores
    and the colour of each score on the dataset's scale (seen in headless Chromium)."""
    from pipeline.report.gallery import misalign_colour

    require_chromium()
    page, dirs = report
    feats = store.concat_rows([store.read_shard(p) for p in store.list_shards(dirs["features"])])
    objs = store.concat_rows([store.read_shard(p) for p in store.list_shards(dirs["objects"])])
    lo, hi = float(feats["obj_misalign"].min()), float(feats["obj_misalign"].max())
    cards = _gallery_objects(page, tmp_path / "profile")
    assert len(cards) == 12
    n_checked = 0
    for card in cards:
        match = re.search(r"img_(\d+)\.png", card["text"])
        assert match, card["text"][:80]
        i = int(match[1])  # the fixture's image k is row k
        a, b = feats["obj_offsets"][i], feats["obj_offsets"][i + 1]
        expected = sorted(
            zip(feats["obj_misalign"][a:b].tolist(), objs["obj_phrase"][a:b]), reverse=True
        )
        assert [o["misalign"] for o in card["objects"]] == pytest.approx(
            [m for m, _ in expected], abs=1e-6
        )
        for shown, (score, phrase) in zip(card["objects"], expected):
            assert shown["text"].startswith(f"{phrase} — misalignment {score:.3f}")
            assert shown["colour"] == _rgb(misalign_colour(score, lo, hi))
            n_checked += 1
    assert n_checked == 12  # six cards with two objects each
    orders = [[o["misalign"] for o in c["objects"]] for c in cards if c["objects"]]
    assert any(objs_in_card != sorted(objs_in_card) for objs_in_card in orders)
    text = parse(page).sections["gallery"]
    assert f"({lo:.3f}, blue)" in text and f"({hi:.3f}, red)" in text


def test_gallery_without_per_object_scores_keeps_grounding_order(tmp_path: Path) -> None:
    dirs = make_run(tmp_path, explained=False)
    text = parse(build(dirs, tmp_path / "report")).sections["gallery"]
    assert "misalignment" not in text and "thing 1 (0.35)" in text


def test_boxes_are_drawn_in_their_misalignment_colour() -> None:
    from pipeline.report.gallery import THUMB_SIZE, _box_label, _thumbnail, misalign_colour

    image = Image.new("RGB", (100, 100), "white")
    colour = misalign_colour(0.9, 0.5, 0.9)
    assert colour == "#d7191c" and misalign_colour(0.5, 0.5, 0.9) == "#2c7bb6"
    boxes = np.array([[10.0, 60.0, 90.0, 90.0]])
    thumb = _thumbnail(image, boxes, [_box_label(0, "x", 0.9)], [colour])
    scale = THUMB_SIZE / 100
    edge = thumb.getpixel((round(50 * scale), round(90 * scale)))
    assert edge == tuple(int(colour[k : k + 2], 16) for k in (1, 3, 5))


def test_empty_qf_matrix_is_a_note(tmp_path):
    """evaluate.qf_matrix: [] makes the stage write {}; the report says so instead of failing."""
    from pipeline.report.figures import qf_section

    path = tmp_path / "qf_matrix.json"
    path.write_text("{}")
    assert "empty" in qf_section(path)
