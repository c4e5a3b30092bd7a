"""The evaluation's measures, computed from log-probabilities alone (no model here, so each is checkable on
known numbers):

- preference accuracies and margins on a split: text preference `log p(y_w|m) > log p(y_l|m)` and image
  preference `log p(y_w|m) > log p(y_w|m')`, with the mean margins;
- the image-sensitivity probe: how much `log p(y_w|m)` drops when the key region is noised, against noising
  a random region of the same area;
- POPE-style object-presence questions: questions built from the pipeline's own grounded key objects in
  POPE's three negative-sampling settings (random, popular, adversarial), each answered by comparing the
  model's log-probabilities of "Yes" and "No"; accuracy, precision, recall, F1 and the yes-ratio.

Ties count half in the accuracies (a model that cannot see scores exactly 0.5 on image preference, chance,
rather than 0), as in an AUC.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

POPE_SETTINGS = ("random", "popular", "adversarial")


def _accuracy(margins: np.ndarray) -> float:
    return (
        float(np.mean(np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0)))) if margins.size else float("nan")
    )


def preference_metrics(
    chosen_clean: Sequence[float], rejected_clean: Sequence[float], chosen_noised: Sequence[float]
) -> dict[str, float]:
    """Per row, log p(y_w|m), log p(y_l|m) and log p(y_w|m'): the text- and image-preference accuracies and
    mean margins (nats). Rows without a dispreferred image pass NaN in `chosen_noised` and are left out of
    the image measures."""
    w, lose, w_noised = (np.asarray(x, dtype=np.float64) for x in (chosen_clean, rejected_clean, chosen_noised))
    text = w - lose
    has_image = ~np.isnan(w_noised)
    image = w[has_image] - w_noised[has_image]
    return {
        "rows": int(w.size),
        "text_preference_accuracy": _accuracy(text),
        "text_margin": float(text.mean()) if text.size else float("nan"),
        "image_rows": int(image.size),
        "image_preference_accuracy": _accuracy(image),
        "image_margin": float(image.mean()) if image.size else float("nan"),
    }


def sensitivity_metrics(
    clean: Sequence[float], key_noised: Sequence[float], random_noised: Sequence[float]
) -> dict[str, float | None]:
    """Mean drop of log p(y_w|·) when the key region is noised and when a random region of the same area is;
    their ratio (None when the random drop is below 1e-6 nats: a model that ignores the image has no ratio to
    speak of, only rounding noise)."""
    c, k, r = (np.asarray(x, dtype=np.float64) for x in (clean, key_noised, random_noised))
    key_drop, random_drop = float(np.mean(c - k)), float(np.mean(c - r))
    return {
        "rows": int(c.size),
        "key_region_drop": key_drop,
        "random_region_drop": random_drop,
        "ratio": key_drop / random_drop if abs(random_drop) > 1e-6 else None,
    }


def pope_metrics(yes_logp: Sequence[float], no_logp: Sequence[float], labels: Sequence[bool]) -> dict[str, float]:
    """A question is answered "yes" when log p(Yes) > log p(No). Positive class: yes (the object is there),
    as in POPE. Precision, recall and F1 are 0 when undefined (nothing predicted or nothing to find)."""
    predicted = np.asarray(yes_logp, dtype=np.float64) > np.asarray(no_logp, dtype=np.float64)
    truth = np.asarray(labels, dtype=bool)
    tp = int(np.sum(predicted & truth))
    fp = int(np.sum(predicted & ~truth))
    fn = int(np.sum(~predicted & truth))
    tn = int(np.sum(~predicted & ~truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "questions": int(truth.size),
        "accuracy": (tp + tn) / truth.size if truth.size else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": float(predicted.mean()) if truth.size else float("nan"),
    }


@dataclass(frozen=True)
class PopeQuestion:
    row: int  # index of the row (its image) in the split
    object: str
    label: bool  # the object is in the image
    setting: str

    @property
    def text(self) -> str:
        return pope_text(self.object)


def pope_text(obj: str) -> str:
    return f"Is there a {obj} in the image?"  # POPE's wording


def pope_questions(
    objects: Sequence[Sequence[str]], setting: str, per_row: int = 3, seed: int = 0
) -> list[PopeQuestion]:
    """POPE's questions for rows whose grounded objects are `objects[i]`: up to `per_row` positives per row
    and as many negatives, objects absent from that row, drawn from all rows' objects
    - random: uniformly;
    - popular: the most frequent objects first;
    - adversarial: the objects that most often appear together with this row's objects first.
    Deterministic for a seed. Rows without objects get no questions."""
    if setting not in POPE_SETTINGS:
        raise ValueError(f"POPE setting {setting!r}: one of {', '.join(POPE_SETTINGS)}")
    sets = [sorted({o.strip().lower() for o in row if o and o.strip()}) for row in objects]
    frequency = Counter(o for row in sets for o in row)
    vocabulary = sorted(frequency)
    together: Counter[tuple[str, str]] = Counter()
    for row in sets:
        for a, b in combinations(row, 2):
            together[(a, b)] += 1
            together[(b, a)] += 1
    rng = random.Random(f"{seed}-{setting}")
    questions: list[PopeQuestion] = []
    for i, present in enumerate(sets):
        if not present:
            continue
        positives = rng.sample(present, min(per_row, len(present)))
        absent = [o for o in vocabulary if o not in present]
        if setting == "random":
            negatives = rng.sample(absent, min(len(positives), len(absent)))
        elif setting == "popular":
            negatives = sorted(absent, key=lambda o: (-frequency[o], o))[: len(positives)]
        else:
            score = {o: sum(together[(p, o)] for p in present) for o in absent}
            negatives = sorted(absent, key=lambda o: (-score[o], -frequency[o], o))[: len(positives)]
        questions += [PopeQuestion(i, o, True, setting) for o in positives]
        questions += [PopeQuestion(i, o, False, setting) for o in negatives]
    return questions
