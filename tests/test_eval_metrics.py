"""The evaluation's measures on known numbers: each equals its hand-computed value."""

from __future__ import annotations

import math

import pytest

from mfpo.eval.metrics import pope_metrics, pope_questions, preference_metrics, sensitivity_metrics


def test_pope_metrics_equal_hand_computed_values():
    # yes/no log-probs of 8 questions; "yes" when yes > no.
    yes = [-0.1, -2.0, -0.3, -0.5, -3.0, -0.2, -1.0, -0.7]
    no = [-2.0, -0.1, -1.0, -0.4, -0.1, -0.9, -1.0, -0.6]
    labels = [True, True, True, True, False, False, False, False]
    # predicted yes: T F T F F T F F  ->  TP 2, FN 2, FP 1, TN 3
    got = pope_metrics(yes, no, labels)
    precision, recall = 2 / 3, 2 / 4
    assert got == pytest.approx(
        {
            "questions": 8,
            "accuracy": 5 / 8,
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall),
            "yes_ratio": 3 / 8,
        }
    )
    assert pope_metrics([-1.0, -1.0], [-0.5, -0.5], [True, False])["precision"] == 0.0  # never says yes


def test_preference_metrics_count_ties_half_and_skip_rows_without_m_prime():
    got = preference_metrics([-1.0, -2.0, -3.0, -1.0], [-2.0, -1.0, -3.0, -4.0], [-1.0, -2.5, float("nan"), -0.5])
    assert got["text_preference_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert got["text_margin"] == pytest.approx((1 - 1 + 0 + 3) / 4)
    assert got["image_rows"] == 3
    assert got["image_preference_accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert got["image_margin"] == pytest.approx((0 + 0.5 - 0.5) / 3)


def test_sensitivity_drops_and_ratio():
    got = sensitivity_metrics([-1.0, -2.0], [-3.0, -5.0], [-1.5, -2.5])
    assert got["key_region_drop"] == pytest.approx(2.5)
    assert got["random_region_drop"] == pytest.approx(0.5)
    assert got["ratio"] == pytest.approx(5.0)
    blind = sensitivity_metrics([-1.0], [-1.0], [-1.0])
    assert blind["key_region_drop"] == 0 and blind["ratio"] is None


def test_pope_questions_follow_the_three_settings():
    rows = [["dog", "frisbee"], ["dog", "leash"], ["cat", "sofa"], ["dog", "frisbee", "grass"], ["cat"]]
    for setting in ("random", "popular", "adversarial"):
        questions = pope_questions(rows, setting, per_row=1, seed=3)
        assert questions == pope_questions(rows, setting, per_row=1, seed=3)  # deterministic
        for q in questions:
            present = {o.lower() for o in rows[q.row]}
            assert (q.object in present) == q.label
        assert sum(q.label for q in questions) == sum(not q.label for q in questions) == len(rows)
    popular = {q.row: q.object for q in pope_questions(rows, "popular", per_row=1) if not q.label}
    assert popular[2] == "dog" and popular[0] == "cat"  # the most frequent absent object (dog 3, cat 2)
    adversarial = {q.row: q.object for q in pope_questions(rows, "adversarial", per_row=1) if not q.label}
    assert adversarial[1] == "frisbee"  # seen twice with dog; popular would give cat (2) or frisbee (2)
    assert adversarial[4] == "sofa"  # the only object ever seen with cat
    with pytest.raises(ValueError, match="one of random, popular, adversarial"):
        pope_questions(rows, "hard")
    assert not math.isnan(pope_metrics([0.0], [-1.0], [True])["accuracy"])


def test_pope_asks_per_picture_and_never_denies_an_object_a_sibling_row_grounded():
    """Several questions about one picture each ground some of its objects: POPE's positives are the union over
    the picture's rows, a negative is never one of them, and each picture is asked once (on its first row)."""
    import datasets

    from mfpo.eval.evaluate import image_questions

    ds = datasets.Dataset.from_dict(
        {
            "image_id": ["kitchen", "kitchen", "kitchen", "street", "park"],
            "box_phrases": [["cup"], ["knife"], [], ["car", "dog"], ["dog", "tree"]],
        }
    ).with_format("arrow")
    for setting in ("random", "popular", "adversarial"):
        for seed in range(50):
            questions = image_questions(ds, len(ds), setting, per_image=3, seed=seed)
            assert {q.row for q in questions} == {0, 3, 4}  # one set per picture, on its first row
            kitchen = [q for q in questions if q.row == 0]
            assert {q.object for q in kitchen if q.label} == {"cup", "knife"}
            assert not {q.object for q in kitchen if not q.label} & {"cup", "knife"}
