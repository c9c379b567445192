"""torch.ao convert of GranQ QAT models: every module kind gives the QAT numbers after convert, and a
static convert before any data is refused. docs/RELIABILITY.md."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import granq_ao
from conftest import prepare


class Embed(nn.Module):
    def __init__(self, bag: bool) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(10, 6) if bag else nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, index):
        return self.fc(self.embed(index))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4, 2, 2))
        self.v = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        y = nn.functional.conv_transpose2d(x, self.w)
        return nn.functional.linear(y.mean((2, 3))[:, :4], self.v)


MODULE_KINDS = {  # name: (model, input shape or integer input)
    "conv_transpose1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(),
                                               nn.ConvTranspose1d(6, 4, 2, stride=2)), (2, 3, 8)),
    "conv_transpose2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                               nn.ConvTranspose2d(6, 4, 2, stride=2)), (2, 3, 8, 8)),
    "conv_transpose3d": (lambda: nn.Sequential(nn.ConvTranspose3d(3, 4, 2, stride=2)), (2, 3, 3, 3, 3)),
    "conv_transpose_bn_relu": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 6, 2, stride=2), nn.BatchNorm2d(6),
                                                     nn.ReLU()), (2, 3, 4, 4)),
    "conv1d_bn_relu": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), nn.ReLU()), (2, 3, 8)),
    "conv2d_bn": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)), (2, 3, 8, 8)),
    "conv3d_bn_relu": (lambda: nn.Sequential(nn.Conv3d(3, 6, 3), nn.BatchNorm3d(6), nn.ReLU()), (2, 3, 5, 5, 5)),
    "bn_relu": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.BatchNorm2d(6), nn.ReLU()), (2, 3, 8, 8)),
    "linear_bn": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.BatchNorm1d(5)), (2, 3, 4, 4)),
    "layer_norm_group_norm": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.LayerNorm(6), nn.GroupNorm(2, 6),
                                                    nn.InstanceNorm2d(6)), (2, 3, 8, 8)),
    "prelu_hardswish": (lambda: nn.Sequential(nn.Conv2d(3, 6, 1), nn.PReLU(), nn.Hardswish()), (2, 3, 5, 5)),
    "embedding": (lambda: Embed(bag=False), "index"),
    "embedding_bag": (lambda: Embed(bag=True), "index"),
    "functional_weights": (Functional, (2, 6, 4, 4)),
}


@pytest.mark.numerics
@pytest.mark.parametrize("kind", sorted(MODULE_KINDS))
def test_every_module_kind_is_quantized_the_same_in_qat_and_convert(kind):
    """A ConvTranspose2d was float in QAT (torch.ao has no QAT module for it) but its weight was
    quantized by the converter (max difference 0.109). Each module kind is now quantized the same
    way in both, or left float in both: the reference model equals the QAT model in eval, and
    weights without a weight fake-quant in QAT are float (unchanged) in the reference model."""
    torch.manual_seed(0)
    build, shape = MODULE_KINDS[kind]
    x = torch.randint(0, 10, (2, 5)) if shape == "index" else torch.randn(*shape)
    float_model = build()
    float_weights = {name: p.detach().clone() for name, p in float_model.named_parameters()}
    qat = prepare(float_model, x)
    qat(x)
    qat.eval()
    ref = granq_ao.convert_to_reference_fx(qat)
    assert torch.equal(ref(x), qat(x))
    quantized = {name for name, module in qat.named_modules() if hasattr(module, "weight_fake_quant")}
    for name, module in ref.named_modules():
        weight = getattr(module, "weight", None)
        key = f"{name}.weight"
        if isinstance(weight, torch.Tensor) and key in float_weights and name not in quantized:
            assert torch.equal(weight, float_weights[key]), f"{kind}: {name} quantized only in convert"


@pytest.mark.parametrize("act", ["granq", "tensor"])
def test_static_convert_before_any_data_is_refused(act):
    """Converting statically before the observers saw a batch succeeded, then failed at inference
    ("length of scales must equal to channel") or, per tensor, returned wrong outputs."""
    example = torch.randn(2, 3, 8, 8)
    qat = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), example, act_granularity=act).eval()
    with pytest.raises(ValueError, match="has seen no data.*representative batches.*mode='dynamic'"):
        granq_ao.convert_to_reference_fx(qat, mode="static")
    granq_ao.convert_to_reference_fx(qat)  # dynamic mode needs no observed ranges
    qat.train()(example)
    ref = granq_ao.convert_to_reference_fx(qat.eval(), mode="static")
    assert ref(example).shape == (2, 4, 6, 6)
