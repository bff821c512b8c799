"""`lazy_adam`: Adam that, on a sparse gradient, updates only the rows the gradient holds.

A dense gradient gets torch's Adam update (no weight decay, no amsgrad). A sparse one (a
`sparse=True` embedding's) moves the moments and the parameter of its rows only, as
`torch.optim.SparseAdam` does: rows a batch did not touch keep their moments instead of
decaying them, so each step costs the rows touched, not the table. One optimizer serves a model
with both kinds of parameters (SparseAdam takes sparse gradients only, Adam dense only), under
one lr schedule. The step count (for the bias correction) is per parameter, counted on every
step the parameter has a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class LazyAdam(torch.optim.Optimizer):
    """Adam for dense gradients, lazy (row-wise) Adam for sparse ones.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        betas: Decay of the first and second moment estimates.
        eps: Added to the denominator.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter with a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        scale = group["lr"] / (1 - beta1**step)
        root = math.sqrt(1 - beta2**step)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        grad = p.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, g = grad.indices()[0], grad.values()
            m_rows = m[rows].mul_(beta1).add_(g, alpha=1 - beta1)
            v_rows = v[rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m[rows], v[rows] = m_rows, v_rows
            denom = v_rows.sqrt().div_(root).add_(group["eps"])
            p.index_add_(0, rows, m_rows.div_(denom).mul_(-scale))
            return
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        p.addcdiv_(m, v.sqrt().div_(root).add_(group["eps"]), value=-scale)
