"""Focal loss (Lin et al., 2017) for the binary fracture task and the multi-class case.

``FL(p_t) = -alpha_t * (1 - p_t) ** gamma * log(p_t)``, computed from logits.

Numerical stability: ``log(p_t)`` comes from ``binary_cross_entropy_with_logits`` /
``log_softmax`` and the modulating factor ``(1 - p_t) ** gamma`` is evaluated as
``exp(gamma * log(1 - p_t))`` with ``log(1 - p_t)`` taken from log-sigmoid /
log-sum-exp terms, never as ``1 - sigmoid(x)``. So logits of +-100 (or bf16 logits, which
are upcast to float32 first) give finite losses and gradients, also for ``gamma < 1``
where ``d/dp (1 - p) ** gamma`` itself is unbounded at ``p = 1``.

Which case applies is decided by the logits' shape:

* binary: logits ``[N]`` or ``[N, 1]``, targets ``[N]`` (or ``[N, 1]``) with values in
  {0, 1} (soft targets in [0, 1] also work). Equal to
  ``torchvision.ops.sigmoid_focal_loss`` (which the tests check).
* multi-class: logits ``[N, C]`` with ``C >= 2``, targets int64 class indices ``[N]``.

``alpha``:

* ``None``: no class weighting (``alpha_t = 1``).
* a float: binary -> weight of the positive class, ``1 - alpha`` for the negative one
  (the RetinaNet convention, torchvision's too). Multi-class -> the same weight for every
  class, i.e. only a scale factor on the loss; a float cannot say which class is "the
  positive one" among C, so pass a sequence to weight classes.
* a sequence: one weight per class (length 2 for binary: ``(w_negative, w_positive)``,
  length C for multi-class).

With ``gamma=0`` and ``alpha=None`` the loss is exactly BCE-with-logits (binary) or
cross-entropy (multi-class).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

AlphaT = Union[None, float, Sequence[float]]

__all__ = ["FocalLoss", "focal_loss"]


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: AlphaT = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Functional form of :class:`FocalLoss`; see the module docstring for the cases."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    # bf16/fp16 logits under autocast: exp/log of low-precision values lose too much
    x = logits.float()

    binary = x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1)
    if binary:
        x = x.reshape(-1)
        t = targets.reshape(-1).to(x.dtype)
        if t.shape != x.shape:
            raise ValueError(f"binary focal loss: {t.numel()} targets for {x.numel()} logits")
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")  # = -log(p_t)
        # log(1 - p_t) with 1 - p_t = t * sigmoid(-x) + (1 - t) * sigmoid(x); log(0) = -inf for the
        # absent term is harmless in logaddexp and gets zero gradient
        log_1m_pt = torch.logaddexp(torch.log(t) + F.logsigmoid(-x), torch.log1p(-t) + F.logsigmoid(x))
        loss = ce if gamma == 0 else ce * torch.exp(gamma * log_1m_pt)
        if alpha is not None:
            if isinstance(alpha, (int, float)):
                a_neg, a_pos = 1.0 - float(alpha), float(alpha)
            else:
                if len(alpha) != 2:
                    raise ValueError(f"binary focal loss needs 2 class weights, got {len(alpha)}")
                a_neg, a_pos = float(alpha[0]), float(alpha[1])
            loss = (a_pos * t + a_neg * (1.0 - t)) * loss
        return _reduce(loss, reduction)

    if x.dim() != 2:
        raise ValueError(f"focal loss expects logits [N], [N, 1] or [N, C], got shape {tuple(x.shape)}")
    n, c = x.shape
    t = targets.reshape(-1).long()
    if t.numel() != n:
        raise ValueError(f"multi-class focal loss: {t.numel()} targets for {n} rows of logits")
    log_p = F.log_softmax(x, dim=1)
    log_pt = log_p.gather(1, t[:, None]).squeeze(1)
    loss = -log_pt
    if gamma != 0:
        # log(1 - p_t) = logsumexp(other classes' logits) - logsumexp(all logits): stable when p_t -> 1
        target_mask = F.one_hot(t, c).bool()
        log_1m_pt = torch.logsumexp(x.masked_fill(target_mask, float("-inf")), dim=1) - torch.logsumexp(x, dim=1)
        loss = loss * torch.exp(gamma * log_1m_pt)
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            loss = float(alpha) * loss
        else:
            weights = torch.as_tensor([float(a) for a in alpha], dtype=x.dtype, device=x.device)
            if weights.numel() != c:
                raise ValueError(f"focal loss: {weights.numel()} class weights for {c} classes")
            loss = weights[t] * loss
    return _reduce(loss, reduction)


class FocalLoss(nn.Module):
    """Focal loss from logits; binary ([N] / [N, 1] logits) or multi-class ([N, C] logits).

    Args:
        alpha: ``None`` (off), a float (binary: positive-class weight; multi-class: a uniform
            scale) or one weight per class. Default 0.25 as in the RetinaNet paper.
        gamma: focusing parameter; 0 gives (alpha-weighted) cross-entropy.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, alpha: AlphaT = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.alpha: Optional[Union[float, tuple[float, ...]]]
        if alpha is None or isinstance(alpha, (int, float)):
            self.alpha = None if alpha is None else float(alpha)
        else:
            self.alpha = tuple(float(a) for a in alpha)
        self.gamma = float(gamma)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"
