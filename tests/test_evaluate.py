"""Tests for pipeline.evaluation.evaluate: every metric against scikit-learn, files, and edge cases."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from pipeline.evaluation.metrics import (
    Scores,
    binary_metrics,
    confusion,
    evaluate_scores,
    pr_points,
    roc_points,
    threshold_for_balanced_accuracy,
)
from pipeline.rows.atomic import write_json_atomic

GENERATORS = ["progan", "sd14", "midjourney"]


def make_scores(seed: int = 0, n_real: int = 60, attribution: bool = True) -> Scores:
    """Random scores where generated images score higher on average, with several generators."""
    rng = np.random.default_rng(seed)
    n_gen = {"progan": 40, "sd14": 25, "midjourney": 15}
    label = np.array([0] * n_real + [1] * sum(n_gen.values()))
    generator = np.array(["real"] * n_real + [g for g, k in n_gen.items() for _ in range(k)])
    p = np.clip(rng.normal(0.35 + 0.3 * label, 0.2), 0.0, 1.0)
    p[:3] = [0.5, 0.0, 1.0]  # a score exactly at the threshold, and both ends
    classes = np.array(["real", *GENERATORS])
    pred = np.where(rng.random(len(label)) < 0.6, np.where(label == 1, generator, "real"), "")
    pred = np.where(pred == "", rng.choice(classes, len(label)), pred)
    return Scores(
        ids=np.array([f"{i:064x}" for i in range(len(label))]),
        label=label,
        generator=generator,
        split=np.where(rng.random(len(label)) < 0.5, "test", "val"),
        p_generated=p,
        pred_class=pred if attribution else None,
    )


def sklearn_block(label: np.ndarray, p: np.ndarray) -> dict:
    """The binary metrics, computed independently with scikit-learn."""
    pred = (p > 0.5).astype(int)
    real, gen = label == 0, label == 1
    return {
        "acc": accuracy_score(label, pred),
        "r_acc": accuracy_score(label[real], pred[real]),
        "f_acc": accuracy_score(label[gen], pred[gen]),
        "ap": average_precision_score(label, p),
        "auc": roc_auc_score(label, p),
        "f1": f1_score(label, pred),
        "n": len(label),
    }


def check_against_sklearn(result: dict, label, generator, p, pred_class=None) -> None:
    label, generator, p = np.asarray(label), np.asarray(generator), np.asarray(p, dtype=float)
    expected = sklearn_block(label, p)
    for key, value in expected.items():
        assert result["overall"][key] == pytest.approx(value, abs=1e-12), key
    if pred_class is not None:
        true = np.where(label == 1, generator, "real")
        for avg in ("macro", "weighted"):
            want = f1_score(true, pred_class, average=avg, zero_division=0)
            assert result["overall"][f"f1_{avg}"] == pytest.approx(want, abs=1e-12)
    gens = sorted(set(generator[label == 1]))
    assert sorted(result["per_generator"]) == gens
    for g in gens:
        mask = (label == 0) | (generator == g)
        want = sklearn_block(label[mask], p[mask])
        block = result["per_generator"][g]
        for key, value in want.items():
            assert block[key] == pytest.approx(value, abs=1e-12), (g, key)
        assert "f1_macro" not in block


def test_metrics_match_sklearn_overall_and_per_generator():
    scores = make_scores()
    result = evaluate_scores(scores)
    check_against_sklearn(
        result, scores.label, scores.generator, scores.p_generated, scores.pred_class
    )
    n_real = int((scores.label == 0).sum())
    for g, block in result["per_generator"].items():
        n_gen = int(((scores.label == 1) & (scores.generator == g)).sum())
        assert block["n"] == n_gen + n_real
        assert (block["n_real"], block["n_generated"]) == (n_real, n_gen)
        assert block["r_acc"] == result["overall"]["r_acc"]  # same real images in every block


def test_threshold_is_strict_and_configurable():
    label = np.array([0, 0, 1, 1])
    p = np.array([0.5, 0.2, 0.5, 0.9])
    m = binary_metrics(label, p)
    assert (m["r_acc"], m["f_acc"], m["acc"]) == (1.0, 0.5, 0.75)  # 0.5 counts as real
    m = binary_metrics(label, p, threshold=0.3)
    assert (m["r_acc"], m["f_acc"]) == (0.5, 1.0)


def test_binary_heads_have_no_f1():
    result = evaluate_scores(make_scores(attribution=False))
    assert "f1_macro" not in result["overall"]
    assert "f1_weighted" not in result["overall"]


def test_single_class_block_reports_none_and_json_stays_valid(tmp_path):
    only_generated = binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert only_generated["r_acc"] is None
    assert only_generated["ap"] is None
    assert only_generated["auc"] is None
    assert only_generated["f_acc"] == pytest.approx(2 / 3)
    only_real = binary_metrics([0, 0], [0.1, 0.7])
    assert only_real["f_acc"] is None
    assert only_real["r_acc"] == 0.5

    scores = Scores(
        ids=["a", "b"],
        label=[1, 1],
        generator=["sd14", "sd14"],
        split=["test"] * 2,
        p_generated=[0.8, 0.3],
        pred_class=["sd14", "real"],
    )
    result = evaluate_scores(scores)
    json.dumps(result, allow_nan=False)
    path = tmp_path / "metrics" / "eval.json"
    write_json_atomic(path, {"mlp": result})
    text = path.read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    assert json.loads(text)["mlp"]["per_generator"]["sd14"]["auc"] is None


def test_eval_json_is_valid_sorted_and_rounded(tmp_path):
    results = {"svm": evaluate_scores(make_scores(1)), "mlp": evaluate_scores(make_scores(2))}
    path = tmp_path / "eval.json"
    write_json_atomic(path, results)
    text = path.read_text()
    loaded = json.loads(text)
    assert list(loaded) == ["mlp", "svm"]
    assert text == json.dumps(loaded, indent=2, sort_keys=True, allow_nan=False) + "\n"
    for head, result in results.items():
        for key, value in result["overall"].items():
            assert loaded[head]["overall"][key] == round(value, 6)
            if isinstance(value, float):
                assert 0.0 <= value <= 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary left behind


def test_write_json_refuses_nan(tmp_path):
    path = tmp_path / "bad.json"
    with pytest.raises(ValueError, match=r"\$\.mlp\.auc is nan"):
        write_json_atomic(path, {"mlp": {"auc": float("nan")}})
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(path, {"n": np.int64(3), "x": np.float32(0.25), "v": np.arange(2)})
    assert json.loads(path.read_text()) == {"n": 3, "x": 0.25, "v": [0, 1]}


def test_csv_round_trip_is_exact(tmp_path):
    scores = make_scores()
    scores.p_generated[5] = 1 / 3  # needs all 17 significant digits
    path = tmp_path / "scores" / "mlp.csv"
    scores.to_csv(path)
    back = Scores.from_csv(path)
    for field in ("ids", "label", "generator", "split", "p_generated", "pred_class"):
        np.testing.assert_array_equal(getattr(back, field), getattr(scores, field), err_msg=field)
    header = path.read_text().splitlines()[0]
    assert header == "id,label,generator,split,p_generated,subset,pred_class"

    binary = make_scores(attribution=False)
    binary.to_csv(tmp_path / "svm.csv")
    assert Scores.from_csv(tmp_path / "svm.csv").pred_class is None


def test_metrics_recomputed_from_csv_with_pandas_and_sklearn_match_exactly(tmp_path):
    """What a user auditing metrics/eval.json does: read the scores CSV, call scikit-learn."""
    scores = make_scores(3)
    test = scores.take(scores.split == "test")
    path = tmp_path / "mlp.csv"
    test.to_csv(path)
    written = evaluate_scores(test)
    write_json_atomic(tmp_path / "eval.json", {"mlp": written})

    df = pd.read_csv(path, keep_default_na=False)
    assert list(df.columns) == [
        "id",
        "label",
        "generator",
        "split",
        "p_generated",
        "subset",
        "pred_class",
    ]
    assert len(df) == len(test)
    y, p = df["label"].to_numpy(), df["p_generated"].to_numpy()
    real, gen = y == 0, y == 1
    audited = {
        "acc": accuracy_score(y, p > 0.5),
        "r_acc": accuracy_score(y[real], p[real] > 0.5),
        "f_acc": accuracy_score(y[gen], p[gen] > 0.5),
        "ap": average_precision_score(y, p),
        "auc": roc_auc_score(y, p),
        "f1_macro": f1_score(
            np.where(gen, df["generator"], "real"), df["pred_class"], average="macro"
        ),
    }
    for key, value in audited.items():
        assert written["overall"][key] == value, key  # exact, not approximate
    g = "sd14"
    mask = real | (df["generator"].to_numpy() == g)
    assert written["per_generator"][g]["auc"] == roc_auc_score(y[mask], p[mask])
    assert written["per_generator"][g]["ap"] == average_precision_score(y[mask], p[mask])

    loaded = json.loads((tmp_path / "eval.json").read_text())
    assert loaded["mlp"]["overall"]["auc"] == round(audited["auc"], 6)
    assert evaluate_scores(Scores.from_csv(path)) == written


def test_bad_inputs_are_rejected_with_the_value():
    with pytest.raises(ValueError, match=r"found \[2\]"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"1\.5"):
        binary_metrics([0, 1], [0.1, 1.5])
    with pytest.raises(ValueError, match="nan"):
        binary_metrics([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        binary_metrics([], [])
    with pytest.raises(ValueError, match=r"Scores.split has shape \(1,\), expected \(2,\)"):
        Scores(ids=["a", "b"], label=[0, 1], generator=["", "x"], split=["t"], p_generated=[0, 1])
    scores = Scores(
        ids=["a", "b"], label=[0, 1], generator=["", ""], split=["t"] * 2, p_generated=[0.2, 0.8]
    )
    with pytest.raises(ValueError, match="generator name"):
        evaluate_scores(scores)


def test_csv_missing_column_is_named(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("id,label,split,p_generated\na,0,test,0.1\n")
    with pytest.raises(ValueError, match=r"lacks columns \['generator'\]"):
        Scores.from_csv(path)


def test_threshold_for_balanced_accuracy_is_optimal():
    rng = np.random.default_rng(4)
    label = np.array([0] * 300 + [1] * 60)  # imbalanced: accuracy and balanced accuracy differ
    p = np.clip(rng.normal(0.2 + 0.25 * label, 0.12), 0, 1)

    def balanced(t: float) -> float:
        pred = p > t
        return (pred[label == 1].mean() + (~pred[label == 0]).mean()) / 2

    t = threshold_for_balanced_accuracy(label, p)
    grid = np.concatenate([np.unique(p), np.linspace(0, 1, 1001)])
    assert balanced(t) == pytest.approx(max(balanced(x) for x in grid), abs=1e-12)
    assert balanced(t) > balanced(0.5)
    assert min(p) <= t <= max(p)


def test_threshold_separable_data_sits_in_the_gap_and_keeps_default_when_optimal():
    label = np.array([0, 0, 1, 1])
    assert threshold_for_balanced_accuracy(label, [0.1, 0.2, 0.4, 0.6]) == pytest.approx(0.3)
    assert threshold_for_balanced_accuracy(label, [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.5)
    # 0.2 and 0.75 both give balanced accuracy 0.75; the one nearer the default wins.
    assert threshold_for_balanced_accuracy([0, 1, 0, 1], [0.1, 0.3, 0.6, 0.9]) == 0.75
    with pytest.raises(ValueError, match="0 real and 2 generated"):
        threshold_for_balanced_accuracy([1, 1], [0.3, 0.4])


def test_roc_and_pr_points_are_json_ready_curves():
    scores = make_scores()
    y, p = scores.label, scores.p_generated
    roc = roc_points(y, p)
    assert (roc[0]["fpr"], roc[0]["tpr"], roc[0]["threshold"]) == (0.0, 0.0, None)
    assert (roc[-1]["fpr"], roc[-1]["tpr"]) == (1.0, 1.0)
    area = np.trapezoid([r["tpr"] for r in roc], [r["fpr"] for r in roc])
    assert area == pytest.approx(roc_auc_score(y, p))
    pr = pr_points(y, p)
    assert (pr[-1]["recall"], pr[-1]["precision"], pr[-1]["threshold"]) == (0.0, 1.0, None)
    recall = np.array([r["recall"] for r in pr])
    precision = np.array([r["precision"] for r in pr])
    assert -np.sum(np.diff(recall) * precision[:-1]) == pytest.approx(average_precision_score(y, p))
    json.dumps({"roc": roc, "pr": pr}, allow_nan=False)
    thin = pr_points(y, p, max_points=10)
    assert len(thin) == 10
    assert thin[0] == pr[0]
    assert thin[-1] == pr[-1]
    with pytest.raises(ValueError, match="needs real and generated"):
        roc_points([1, 1], [0.2, 0.3])


def test_confusion_matches_sklearn_with_real_first():
    scores = make_scores()
    labels, matrix = confusion(scores.true_class, scores.pred_class)
    assert labels == ["real", "midjourney", "progan", "sd14"]
    np.testing.assert_array_equal(
        matrix, confusion_matrix(scores.true_class, scores.pred_class, labels=labels)
    )
    assert matrix.sum() == len(scores)
    assert matrix[0].sum() == int((scores.label == 0).sum())  # rows are true classes


def test_subset_selects_rows_of_every_column():
    scores = make_scores()
    test = scores.take(scores.split == "test")
    assert set(test.split) == {"test"}
    assert len(test) == int((scores.split == "test").sum())
    assert test.pred_class is not None
    assert len(test.pred_class) == len(test)
    assert math.isclose(test.p_generated.sum(), scores.p_generated[scores.split == "test"].sum())


def test_summary_is_compact_and_takes_the_mean_block_or_computes_it(tmp_path):
    from pipeline.evaluation.summary import head_summary, write_summaries

    per_gen = {"a": {"acc": 0.5, "ap": 0.75, "n": 4}, "b": {"acc": 1.0, "ap": None, "n": 4}}
    block = {"overall": {"acc": 0.7, "ap": 0.8, "auc": 0.9, "n": 8, "r_acc": 0.6}}
    block.update(per_generator=per_gen, preset="tiny", models={"clip": "tiny-clip"})
    assert head_summary(block) == {
        "acc": 0.7,
        "ap": 0.8,
        "auc": 0.9,
        "bacc": None,  # needs both r_acc and f_acc
        # undefined values are left out of the mean
        "mean": {"acc": 0.75, "ap": 0.75, "bacc": None},
        "n": 8,
        "preset": "tiny",
    }
    mean = {"acc": 0.1, "ap": 0.2, "r_acc": 0.3, "f_acc": 0.5, "n_own": 1, "n_all": 2}
    with_mean = {**block, "mean": {**mean, "n_blocks": 3}}
    assert head_summary(with_mean)["mean"] == {"acc": 0.1, "ap": 0.2, "bacc": 0.4, "n_all": 2}
    (tmp_path / "s" / "stale.json").parent.mkdir()
    (tmp_path / "s" / "stale.json").write_text("{}")
    paths = write_summaries({"mlp": block, "svm": with_mean, "note": "x"}, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["mlp.json", "svm.json"]
    assert json.loads(paths[0].read_text())["mean"]["acc"] == 0.75


def test_headline_has_each_heads_auc_under_names_no_summary_uses():
    from pipeline.evaluation.summary import head_summary, headline

    blocks = {
        "mlp": {"overall": {"auc": 0.9, "acc": 0.8}, "preset": "tiny"},
        "svm": {"overall": {"auc": 0.7}, "preset": "tiny"},
        "shortcut": "not a head",
    }
    line = headline(blocks)
    assert line == {"auc": {"mlp": 0.9, "svm": 0.7}, "preset": "tiny"}
    # `dvc exp show` prints a metric's bare name only when no other metrics file has it
    names = {f"auc.{head}" for head in line["auc"]}
    assert not names & set(head_summary(blocks["mlp"]))
    assert (
        headline({"a": {"overall": {}, "preset": "tiny"}, "b": {"overall": {}, "preset": "paper"}})[
            "preset"
        ]
        == "paper+tiny"
    )
