"""LAMB: Adam with a layer-wise trust ratio, the large-batch answer of You et al. 2020 (``--optimizer lamb``).

Per parameter tensor ``w``: the Adam direction ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w``
(bias-corrected moments, as :class:`torch.optim.Adam`), the trust ratio
``r = ||w|| / ||u||`` (1 when either norm is 0), and the step ``w -= lr * r * u``. So every tensor
moves by ``lr * ||w||`` per step whatever its gradient scale: the LR is a relative step size, and
the same LR rules (``--lr-scaling``) apply to it. Measured against Adam in bench/time_to_accuracy.py.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class Lamb(torch.optim.Optimizer):
    """LAMB (layer-wise adaptive moments), one trust ratio per parameter tensor."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update * (trust * group["lr"]))
        return loss
