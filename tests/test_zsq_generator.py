"""GDFQ generator: architecture, output statistics, conditioning, gradients, sampling."""
import pytest
import torch
from torch import nn

from granq_ao.zsq import GDFQGenerator


def expected_parameter_count(classes, latent=100, init=8):
    return (classes * latent                       # label embedding
            + latent * 128 * init * init + 128 * init * init   # linear
            + 2 * 128                               # BN(128)
            + 128 * 128 * 9 + 128 + 2 * 128         # conv 128 -> 128, BN(128, eps .8)
            + 128 * 64 * 9 + 64 + 2 * 64            # conv 128 -> 64, BN(64, eps .8)
            + 64 * 3 * 9 + 3)                       # conv 64 -> 3, BN(3, affine=False): no params


@pytest.mark.parametrize("classes", [10, 100])
def test_architecture_matches_gdfq(classes):
    g = GDFQGenerator(classes)
    assert sum(p.numel() for p in g.parameters()) == expected_parameter_count(classes)
    assert g.bn0.eps == 1e-5 and g.bn1.eps == 0.8 and g.bn2.eps == 0.8
    assert not g.bn_out.affine and g.bn_out.num_features == 3
    assert [m.kernel_size for m in g.modules() if isinstance(m, nn.Conv2d)] == [(3, 3)] * 3


def test_output_shape_and_normalized_channels():
    torch.manual_seed(0)
    g = GDFQGenerator(10).train()
    z, labels = g.sample_inputs(16)
    seen = []
    g.bn_out.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    x = g(z, labels)
    assert x.shape == (16, 3, 32, 32)
    # the final affine-free BN in train mode: each channel has batch mean 0 and biased variance
    # v / (v + eps), v = the variance of the tanh output (in (-1, 1)) it normalizes
    tanh_out = seen[0]
    assert tanh_out.abs().max() < 1
    v = tanh_out.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.var(dim=(0, 2, 3), unbiased=False), v / (v + 1e-5), rtol=1e-4)


def test_labels_condition_the_output_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    g = GDFQGenerator(10).train()
    z = torch.randn(8, 100)
    a = g(z, torch.zeros(8, dtype=torch.long))
    b = g(z, torch.full((8,), 3, dtype=torch.long))
    assert not torch.allclose(a, b)
    # a loss that is not invariant to the final BN's normalization
    (g(z, torch.arange(8)) * torch.randn(8, 3, 32, 32)).sum().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sampling_is_reproducible_from_a_torch_generator():
    g = GDFQGenerator(100)
    z1, y1 = g.sample_inputs(5, torch.Generator().manual_seed(7))
    z2, y2 = g.sample_inputs(5, torch.Generator().manual_seed(7))
    assert torch.equal(z1, z2) and torch.equal(y1, y2)
    assert z1.shape == (5, 100) and y1.dtype == torch.long and 0 <= int(y1.min()) and int(y1.max()) < 100


def test_image_size_must_be_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        GDFQGenerator(10, img_size=30)


# ----------------------------------------------------------------------------- ImageNet generator
def imagenet_parameter_count(classes, latent=100, init=56):
    return (latent * 128 * init * init + 128 * init * init   # linear (no label embedding on z)
            + 2 * classes * 128                           # CBN_0(128): gamma, beta per class
            + 128 * 128 * 9 + 128 + 2 * classes * 128     # conv 128 -> 128, CBN_1(128, eps .8)
            + 128 * 64 * 9 + 64 + 2 * classes * 64        # conv 128 -> 64, CBN_2(64, eps .8)
            + 64 * 3 * 9 + 3)                             # conv 64 -> 3, BN(3, affine=False)


def test_imagenet_generator_architecture():
    from granq_ao.zsq import ImageNetGenerator

    g = ImageNetGenerator(1000)
    assert sum(p.numel() for p in g.parameters()) == imagenet_parameter_count(1000)
    assert g.cbn0.bn.eps == 1e-5 and g.cbn1.bn.eps == 0.8 and g.cbn2.bn.eps == 0.8
    assert not g.cbn0.bn.affine and not g.bn_out.affine
    assert torch.equal(g.cbn1.gamma.weight, torch.ones(1000, 128)) and not g.cbn1.beta.weight.any()
    small = ImageNetGenerator(5, img_size=32)
    assert sum(p.numel() for p in small.parameters()) == imagenet_parameter_count(5, init=8)


def test_imagenet_generator_output_conditioning_and_gradients():
    from granq_ao.zsq import ImageNetGenerator

    torch.manual_seed(0)
    g = ImageNetGenerator(7, img_size=32).train()
    with torch.no_grad():  # make the classes differ (they start identical: gamma 1, beta 0)
        for cbn in (g.cbn0, g.cbn1, g.cbn2):
            cbn.gamma.weight.normal_(1, 0.5)
            cbn.beta.weight.normal_(0, 0.5)
    z, labels = g.sample_inputs(6, torch.Generator().manual_seed(1))
    x = g(z, labels)
    assert x.shape == (6, 3, 32, 32)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    a = g(z, torch.zeros(6, dtype=torch.long))
    b = g(z, torch.full((6,), 4, dtype=torch.long))
    assert not torch.allclose(a, b)
    (g(z, torch.arange(6)) * torch.randn(6, 3, 32, 32)).sum().backward()
    for name, p in g.named_parameters():
        if name.endswith(("gamma.weight", "beta.weight")):  # only the rows of the labels used get gradients
            assert p.grad[:6].abs().sum() > 0 and not p.grad[6:].any(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="multiple of 4"):
        ImageNetGenerator(3, img_size=30)
