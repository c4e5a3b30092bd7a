"""The MFPO loss (Jiang et al., arXiv 2410.15334; the functional form of mDPO's loss).

With r(y | t, m) = beta * (log pi_theta(y | t, m) - log pi_ref(y | t, m)), log-probs summed over the
answer tokens:

    L_text   = -log sigmoid( r(y_w | t, m) - r(y_l | t, m) )      chosen over rejected answer, clean image
    L_image  = -log sigmoid( r(y_w | t, m) - r(y_w | t, m') )     same answer, clean over dispreferred image
    L_margin = -log sigmoid( r(y_w | t, m) - eta )                 the chosen reward stays above eta
    L        = w_text * L_text + w_image * L_image + w_margin * L_margin     (each averaged over the batch)

Rows without a dispreferred image (perturb's `skip` fallback) leave L_image out: it is averaged over the
rows that have one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    beta: float = 0.1
    eta: float = 0.0
    text: float = 1.0
    image: float = 1.0
    margin: float = 1.0


def mfpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, has_image: torch.Tensor, w: LossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """policy, reference: (batch, 3) summed answer log-probs of (y_w | m), (y_l | m), (y_w | m').
    has_image: (batch,) bool, whether the row has a dispreferred image. Returns (loss, metrics)."""
    rewards = w.beta * (policy - reference.to(policy.dtype))
    r_w, r_l, r_wn = rewards[:, 0], rewards[:, 1], rewards[:, 2]
    has_image = has_image.to(torch.bool)
    l_text = -F.logsigmoid(r_w - r_l)
    l_image_rows = -F.logsigmoid(r_w - r_wn)
    l_image = l_image_rows[has_image].mean() if has_image.any() else policy.new_zeros(())
    l_margin = -F.logsigmoid(r_w - w.eta)
    loss = w.text * l_text.mean() + w.image * l_image + w.margin * l_margin.mean()
    with torch.no_grad():
        image_margin = (r_w - r_wn)[has_image]
        metrics = {
            "loss/text": l_text.mean(),
            "loss/image": l_image,
            "loss/margin": l_margin.mean(),
            "rewards/chosen": r_w.mean(),
            "rewards/rejected": r_l.mean(),
            "rewards/chosen_noised": r_wn[has_image].mean() if has_image.any() else policy.new_zeros(()),
            "margins/text": (r_w - r_l).mean(),
            "margins/image": image_margin.mean() if has_image.any() else policy.new_zeros(()),
            "accuracy/text": (r_w > r_l).float().mean(),
            "accuracy/image": (image_margin > 0).float().mean() if has_image.any() else policy.new_zeros(()),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
