"""timm (1.0.31) as a client: five families, random init, small inputs, drop rates that are active.

Each model: FX prepare (act_placement="inputs", the placement that works without ReLU) -> one
training step -> granq_ao.convert_to_reference_fx equal to the QAT model in eval; PT2E prepare ->
convert equal; no NaN anywhere; evaluations deterministic. Then zero_shot_qat for 2 iterations on
a timm BatchNorm network, and the refusal of a ConvNeXt (LayerNorm, no BatchNorm) teacher
(a ValueError naming BatchNorm; today raised at the first generator step, earlier once zsq checks
the teacher before building the student).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import granq_ao
from granq_ao.config import GranQScheme

timm = pytest.importorskip("timm")

SCHEME = GranQScheme.from_kwargs(4, 4, act_placement="inputs", fused="eager")
SIZE = 32
#: name -> create_model options; drop rates > 0 so that dropout (functional in the ResNet,
#: EfficientNet and MobileNetV3 heads, nn.Dropout in the others) is really there
MODELS = {
    "resnet10t": dict(drop_rate=0.5),                  # ResNet-D stem/avg-down; zero_init_last: 4 zero BNs
    "tinynet_e": dict(drop_rate=0.5),                  # EfficientNet family: SiLU, squeeze-excitation, BatchNormAct2d
    "mobilenetv3_small_050": dict(drop_rate=0.5),      # hard-swish, depthwise, SE with hard-sigmoid
    "regnetx_002": dict(drop_rate=0.5),                # grouped convs, zero_init_last
    "convnext_atto": dict(drop_rate=0.5),              # LayerNorm, GELU, depthwise 7x7; no BatchNorm
}


@pytest.fixture(autouse=True)
def _eager_math(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "eager")


def create(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, num_classes=10, **MODELS[name])


def evaluate_twice(model, x):
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)  # deterministic in eval mode (no dropout, running statistics)
    return first


@pytest.mark.parametrize("name", list(MODELS))
def test_fx_train_step_then_reference_convert(name):
    model = create(name)
    example = (torch.randn(2, 3, SIZE, SIZE),)
    qat = granq_ao.prepare_qat_fx(model.train(), granq_ao.get_granq_qat_qconfig_mapping(SCHEME), example)
    assert granq_ao.count_activation_fake_quant_calls(qat) > 0
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    x = torch.randn(4, 3, SIZE, SIZE)
    loss = torch.nn.functional.cross_entropy(qat(x), torch.arange(4))
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    qat.eval()
    out = evaluate_twice(qat, x)
    with torch.no_grad():  # eval: no batch statistics anywhere; the same batch size runs the same kernels
        others = torch.cat([x[:2], torch.randn(2, 3, SIZE, SIZE)])
        assert torch.equal(out[:2], qat(others)[:2])
    reference = granq_ao.convert_to_reference_fx(copy.deepcopy(qat))
    assert torch.equal(evaluate_twice(reference, x), out)


#: torchao exports its conv-bn QAT patterns at each prepare (~100 of them again at each convert,
#: to fold them: tens of seconds on CPU, whatever the model). PT2E runs on three families (FX on
#: all five) and converts one BN network and the LayerNorm one, to keep the file near 2 minutes.
PT2E_MODELS = ("resnet10t", "mobilenetv3_small_050", "convnext_atto")
CONVERTED = ("resnet10t", "convnext_atto")


@pytest.mark.parametrize("name", PT2E_MODELS)
def test_pt2e_prepare_convert_equal(name):
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from granq_ao.integrations.torchao import GranQQuantizer, export_for_qat, granq_fake_quant_calls, prepare_qat

    model = create(name)
    prepared = prepare_qat(export_for_qat(model, (torch.randn(2, 3, SIZE, SIZE),)), GranQQuantizer(SCHEME))
    assert len(granq_fake_quant_calls(prepared)["activation"]) > 0
    x = torch.randn(4, 3, SIZE, SIZE)
    assert torch.isfinite(prepared(x)).all()  # train form
    prepared = move_exported_model_to_eval(prepared)
    out = evaluate_twice(prepared, x)
    with torch.no_grad():
        assert torch.equal(out[:2], prepared(x[:2]))
    if name in CONVERTED:
        converted = convert_pt2e(prepared)
        assert torch.equal(evaluate_twice(converted, x), out)


def tiny_config(**changes):
    from granq_ao.zsq import ZSQConfig

    values = dict(epochs=1, iters_per_epoch=2, batch_size=2, warmup_epochs=0, eval_batch_size=4, seed=0,
                  act_placement="inputs")
    values.update(changes)
    return ZSQConfig(**values)


QUIET = dict(tensorboard=False, progress=False, log=lambda message: None, fused="eager")


def test_zero_shot_qat_on_a_timm_batchnorm_network():
    from granq_ao.zsq import zero_shot_qat

    teacher = create("resnet10t").eval()
    student, results = zero_shot_qat(teacher, tiny_config(), num_classes=10, image_size=SIZE, **QUIET)
    assert results["fake_quants"]["activation"] > 0
    x = torch.randn(3, 3, SIZE, SIZE)
    evaluate_twice(student.eval(), x)


def test_zero_shot_qat_refuses_a_teacher_without_batchnorm():
    from granq_ao.zsq import zero_shot_qat

    with pytest.raises(ValueError, match="BatchNorm"):
        zero_shot_qat(create("convnext_atto").eval(), tiny_config(), num_classes=10, image_size=SIZE, **QUIET)
