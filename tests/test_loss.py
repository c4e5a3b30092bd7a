"""The MFPO loss against its closed form on hand-chosen log-probs, and the direction of its gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mfpo.loss import LossWeights, mfpo_loss


def softplus(x: float) -> float:  # -log sigmoid(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


POLICY = [[-10.0, -14.0, -13.0], [-20.0, -19.0, -21.0]]
REFERENCE = [[-11.0, -12.0, -12.5], [-20.5, -20.0, -20.0]]


def closed_form(w: LossWeights, has_image: list[bool]) -> dict[str, float]:
    text, image, margin = [], [], []
    for p, r, keep in zip(POLICY, REFERENCE, has_image, strict=True):
        rw, rl, rn = (w.beta * (p[i] - r[i]) for i in range(3))
        text.append(softplus(rw - rl))
        margin.append(softplus(rw - w.eta))
        if keep:
            image.append(softplus(rw - rn))
    t, m = sum(text) / len(text), sum(margin) / len(margin)
    i = sum(image) / len(image) if image else 0.0
    return {"text": t, "image": i, "margin": m, "total": w.text * t + w.image * i + w.margin * m}


@pytest.mark.parametrize(
    ("weights", "has_image"),
    [
        (LossWeights(), [True, True]),
        (LossWeights(beta=0.5, eta=0.2), [True, True]),
        (LossWeights(beta=0.1, text=2.0, image=0.5, margin=0.0), [True, False]),
        (LossWeights(text=0.0, image=0.0, margin=1.0, eta=-1.0), [False, False]),
    ],
)
def test_loss_equals_closed_form(weights: LossWeights, has_image: list[bool]):
    loss, metrics = mfpo_loss(
        torch.tensor(POLICY, dtype=torch.float64),
        torch.tensor(REFERENCE, dtype=torch.float64),
        torch.tensor(has_image),
        weights,
    )
    expected = closed_form(weights, has_image)
    assert loss.item() == pytest.approx(expected["total"], abs=1e-12)
    assert metrics["loss/text"].item() == pytest.approx(expected["text"], abs=1e-12)
    assert metrics["loss/image"].item() == pytest.approx(expected["image"], abs=1e-12)
    assert metrics["loss/margin"].item() == pytest.approx(expected["margin"], abs=1e-12)


def test_metrics():
    _, m = mfpo_loss(torch.tensor(POLICY), torch.tensor(REFERENCE), torch.tensor([True, True]), LossWeights(beta=1.0))
    # rewards: row 0 (1, -2, -0.5), row 1 (0.5, 1, -1)
    assert m["rewards/chosen"].item() == pytest.approx(0.75)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["margins/text"].item() == pytest.approx((3 - 0.5) / 2)
    assert m["accuracy/text"].item() == 0.5 and m["accuracy/image"].item() == 1.0


def test_gradients_push_the_preferred_way():
    policy = torch.tensor(POLICY, requires_grad=True)
    loss, _ = mfpo_loss(policy, torch.tensor(REFERENCE), torch.tensor([True, True]), LossWeights())
    loss.backward()
    g = policy.grad
    assert (g[:, 0] < 0).all()  # descending the loss raises log p(y_w | m)
    assert (g[:, 1] > 0).all()  # lowers log p(y_l | m)
    assert (g[:, 2] > 0).all()  # lowers log p(y_w | m')


def test_beta_scales_rewards_and_eta_moves_the_anchor():
    p, r, h = torch.tensor(POLICY), torch.tensor(REFERENCE), torch.tensor([True, True])
    _, small = mfpo_loss(p, r, h, LossWeights(beta=0.1))
    _, large = mfpo_loss(p, r, h, LossWeights(beta=1.0))
    assert large["rewards/chosen"].item() == pytest.approx(10 * small["rewards/chosen"].item())
    _, low = mfpo_loss(p, r, h, LossWeights(eta=-5.0))
    _, high = mfpo_loss(p, r, h, LossWeights(eta=5.0))
    assert low["loss/margin"] < high["loss/margin"]  # a higher anchor is harder to clear
