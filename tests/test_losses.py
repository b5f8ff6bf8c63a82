"""FocalLoss against direct formulas, torchvision, and cross-entropy; stability at extreme logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from losses import FocalLoss


def _direct_binary(x: torch.Tensor, t: torch.Tensor, alpha, gamma: float) -> torch.Tensor:
    # the paper's formula, in float64 so it is a trustworthy reference on moderate logits
    x, t = x.double(), t.double()
    p = torch.sigmoid(x)
    pt = torch.where(t == 1, p, 1 - p)
    if alpha is None:
        at = torch.ones_like(pt)
    else:
        at = torch.where(t == 1, torch.full_like(pt, alpha), torch.full_like(pt, 1 - alpha))
    return -at * (1 - pt) ** gamma * torch.log(pt)


def _direct_multiclass(x: torch.Tensor, t: torch.Tensor, alpha, gamma: float) -> torch.Tensor:
    p = torch.softmax(x.double(), dim=1)
    pt = p[torch.arange(len(t)), t]
    if alpha is None:
        at = torch.ones_like(pt)
    elif isinstance(alpha, float):
        at = torch.full_like(pt, alpha)
    else:
        at = torch.tensor(alpha, dtype=torch.float64)[t]
    return -at * (1 - pt) ** gamma * torch.log(pt)


@pytest.mark.parametrize("alpha", [None, 0.25, 0.7])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_binary_matches_direct_formula(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * 4
    t = (torch.rand(64, generator=g) > 0.6).float()
    for reduction, reduce in (("none", lambda v: v), ("mean", torch.mean), ("sum", torch.sum)):
        got = FocalLoss(alpha=alpha, gamma=gamma, reduction=reduction)(x, t)
        want = reduce(_direct_binary(x, t, alpha, gamma)).float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_binary_matches_torchvision(alpha, gamma):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 1, generator=g) * 3  # [N, 1] logits as a 1-output head gives them
    t = torch.randint(0, 2, (50,), generator=g)
    want = sigmoid_focal_loss(x.squeeze(1), t.float(), alpha=alpha, gamma=gamma, reduction="mean")
    got = FocalLoss(alpha=None if alpha < 0 else alpha, gamma=gamma)(x, t)  # torchvision: alpha<0 means off
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    got_none = FocalLoss(alpha=alpha if alpha >= 0 else None, gamma=gamma, reduction="none")(x, t)
    torch.testing.assert_close(
        got_none, sigmoid_focal_loss(x.squeeze(1), t.float(), alpha=alpha, gamma=gamma, reduction="none")
    )


@pytest.mark.parametrize("alpha", [None, 0.25, (0.2, 0.5, 0.3)])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_multiclass_matches_direct_formula(alpha, gamma):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 3, generator=g) * 3
    t = torch.randint(0, 3, (40,), generator=g)
    got = FocalLoss(alpha=alpha, gamma=gamma, reduction="none")(x, t)
    torch.testing.assert_close(got, _direct_multiclass(x, t, alpha, gamma).float(), rtol=1e-5, atol=1e-6)


def test_gamma0_alpha_off_is_cross_entropy():
    g = torch.Generator().manual_seed(3)
    xb = torch.randn(32, generator=g) * 5
    tb = torch.randint(0, 2, (32,), generator=g).float()
    torch.testing.assert_close(FocalLoss(alpha=None, gamma=0)(xb, tb), F.binary_cross_entropy_with_logits(xb, tb))
    xm = torch.randn(32, 4, generator=g) * 5
    tm = torch.randint(0, 4, (32,), generator=g)
    torch.testing.assert_close(FocalLoss(alpha=None, gamma=0)(xm, tm), F.cross_entropy(xm, tm))
    torch.testing.assert_close(
        FocalLoss(alpha=None, gamma=0, reduction="sum")(xm, tm), F.cross_entropy(xm, tm, reduction="sum")
    )


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_extreme_logits_give_finite_loss_and_gradients(gamma):
    # confidently right and confidently wrong, both directions
    xb = torch.tensor([100.0, -100.0, 100.0, -100.0, 0.0], requires_grad=True)
    tb = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    lb = FocalLoss(alpha=0.25, gamma=gamma)(xb, tb)
    lb.backward()
    assert torch.isfinite(lb) and torch.isfinite(xb.grad).all()
    assert lb.item() > 10  # the two wrong ones cost ~100 each (times alpha weights)
    # a confidently wrong logit still gets a gradient pushing it the right way
    assert xb.grad[2] > 0 and xb.grad[3] < 0

    xm = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, -100.0], [100.0, -100.0, -100.0]], requires_grad=True)
    tm = torch.tensor([0, 1, 2])
    lm = FocalLoss(alpha=(1.0, 2.0, 0.5), gamma=gamma)(xm, tm)
    lm.backward()
    assert torch.isfinite(lm) and torch.isfinite(xm.grad).all()
    assert xm.grad[2, 2] < 0  # raise the wrong row's target logit


def test_bf16_logits_are_upcast():
    x = torch.randn(16, 3).bfloat16()
    t = torch.randint(0, 3, (16,))
    loss = FocalLoss()(x, t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, FocalLoss()(x.float(), t))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="reduction"):
        FocalLoss(reduction="avg")
    with pytest.raises(ValueError, match="class weights"):
        FocalLoss(alpha=(0.5, 0.5))(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="targets"):
        FocalLoss()(torch.randn(4), torch.ones(5))
