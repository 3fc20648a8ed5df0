"""Each fast op equals its plain torch reference, values and gradients."""

import pytest
import torch

from flatstack.kernels import linear_cross_entropy as lce


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.577])
def test_linear_cross_entropy_matches_reference(with_mask, scale, monkeypatch):
    """Row weights stand for a loss mask divided by the number of counted rows."""
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 7 * 50)  # several chunks, the last one short
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 50, (23,), generator=gen)
    mask = (torch.rand(23, generator=gen) > 0.4).float() / 9 if with_mask else None
    ref = lce.reference(h, w, t, mask, scale)
    ref_grads = torch.autograd.grad(ref * 1.7, (h, w))
    ours = lce.linear_cross_entropy(h, w, t, mask, scale)
    grads = torch.autograd.grad(ours * 1.7, (h, w))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_without_grad_only_computes_the_loss():
    h, w = torch.randn(5, 8), torch.randn(11, 8)
    t = torch.randint(0, 11, (5,))
    with torch.no_grad():
        torch.testing.assert_close(lce.linear_cross_entropy(h, w, t), lce.reference(h, w, t))
