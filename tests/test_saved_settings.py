"""The settings that shape a quantizer's numbers travel with its state_dict in every integration
(torch.ao FX is covered in test_prepared_model_saving.py): a 4-bit state_dict loaded into an 8-bit (or
symmetric, or other-granularity) quantizer is refused with both settings named; state_dicts saved
before settings were saved still load."""
import importlib.util

import pytest
import torch
from torch import nn

from granq_ao.config import GranQConfig, GranQScheme
from granq_ao.saved_settings import describe_settings, settings_mismatch, settings_tensor


def test_settings_tensor_and_description():
    config = GranQConfig.for_activation(3)
    assert settings_tensor(config).tolist() == [3, 0, 0, 1, 0, 7]
    assert describe_settings(settings_tensor(config)) == "3-bit asymmetric granq (axis 1, grid [0, 7])"
    assert describe_settings(settings_tensor(GranQConfig.for_weight(4, "kernel", symmetric=True))) == \
        "4-bit symmetric kernel (axis 1, grid [-8, 7])"
    # the iterative method computes the same ranges: the same settings
    assert torch.equal(settings_tensor(GranQConfig.for_activation(3, "granq_iterative")), settings_tensor(config))
    assert settings_mismatch(None, config, "m") is None
    assert settings_mismatch(settings_tensor(config), config, "m") is None
    assert "m: the state_dict was saved from a 4-bit" in settings_mismatch(
        settings_tensor(GranQConfig.for_activation(4)), config, "m")


OTHER_SETTINGS = [dict(act_bits=8), dict(symmetric_acts=True), dict(act_granularity="tensor"),
                  dict(weight_granularity="kernel")]


def _check_refusal(build, other):
    trained = build(GranQScheme.from_kwargs(4, 4, fused="eager"))
    state = trained.state_dict()
    assert any(key.endswith("_extra_state") for key in state)
    build(GranQScheme.from_kwargs(4, 4, fused="eager")).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"saved from a 4-bit asymmetric .* this one is .*Prepare the model"):
        build(GranQScheme.from_kwargs(**{"weight_bits": 4, "act_bits": 4, "fused": "eager", **other})).load_state_dict(state)
    build(GranQScheme.from_kwargs(4, 4, fused="eager")).load_state_dict(
        {key: value for key, value in state.items() if not key.endswith("_extra_state")})


@pytest.mark.parametrize("other", OTHER_SETTINGS)
def test_torchao_quantize_modules(other):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from granq_ao.integrations.torchao import GranQQATConfig, is_conv_or_linear

    def build(scheme):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        quantize_(model, GranQQATConfig(scheme), filter_fn=is_conv_or_linear)
        return model

    _check_refusal(build, other)


@pytest.mark.parametrize("other", OTHER_SETTINGS[:2])
def test_torchao_pt2e_graph(other):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from granq_ao.integrations.torchao import GranQQuantizer, export_for_qat

    def build(scheme):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
        return prepare_qat_pt2e(export_for_qat(model, (torch.randn(2, 3, 6, 6),)), GranQQuantizer(scheme))

    _check_refusal(build, other)


@pytest.mark.parametrize("other", OTHER_SETTINGS[:3])
def test_pytorch_quantization_quantizers(other):
    pytest.importorskip("pytorch_quantization")
    from granq_ao.integrations.pytorch_quantization import GranQDescriptor, GranQTensorQuantizer

    def build(scheme):
        activation = scheme.activation
        return nn.ModuleDict({"input_quantizer": GranQTensorQuantizer(GranQDescriptor(
            num_bits=activation.bits, granularity=activation.name, symmetric=activation.symmetric, fused="eager"))})

    _check_refusal(build, other)


def test_the_four_quantizer_classes_share_one_state_mixin():
    """One shell for the saved settings, enable flags and labelled errors (granq_ao.quantizer_state);
    the hooks where the hosts differ are explicit."""
    from granq_ao.integrations.torch_ao import GranQFakeQuantize
    from granq_ao.quantizer_state import EnableFlagsMixin, QuantizerStateMixin

    classes = [GranQFakeQuantize]
    if importlib.util.find_spec("torchao") is not None:
        from granq_ao.integrations.torchao.fake_quantize import GranQPT2EFakeQuantize
        from granq_ao.integrations.torchao.reference_modules import GranQReference
        classes += [GranQPT2EFakeQuantize, GranQReference]
        assert issubclass(GranQPT2EFakeQuantize, EnableFlagsMixin) and GranQPT2EFakeQuantize.keep_state_if_absent
    if importlib.util.find_spec("pytorch_quantization") is not None:
        from granq_ao.integrations.pytorch_quantization import GranQTensorQuantizer
        classes.append(GranQTensorQuantizer)
        assert GranQTensorQuantizer._load_host_state is not QuantizerStateMixin._load_host_state  # bypass
    for cls in classes:
        assert issubclass(cls, QuantizerStateMixin), cls
        for name in ("get_extra_state", "set_extra_state", "_load_from_state_dict"):
            assert getattr(cls, name) is getattr(QuantizerStateMixin, name), (cls, name)
    assert not GranQFakeQuantize.keep_state_if_absent

    fake_quant = GranQFakeQuantize(bits=4)
    fake_quant.disable_fake_quant()
    fresh = GranQFakeQuantize(bits=4)
    fresh.load_state_dict(fake_quant.state_dict())
    assert not fresh.fake_quant_on and fresh._observer_on  # the mirrors follow the loaded buffers
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(fresh(x), x)
    error = fresh.labelled(ValueError("bad rank"), "input")
    assert type(error) is ValueError and str(error) == "GranQFakeQuantize (input): bad rank"
