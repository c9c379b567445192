"""QAT student: fake-quants placed as in the paper, BN frozen, equal to the teacher without quantization."""
import pytest
import torch
from torch.ao.quantization import disable_fake_quant, enable_fake_quant

from granq_ao.zsq.teachers import build_cifar_teacher, default_teacher_weights
from granq_ao.config import GranQScheme
from granq_ao.zsq import count_fake_quants, prepare_student

pytestmark = pytest.mark.skipif(not default_teacher_weights("cifar10").is_file(),
                                reason="offline teacher weights not available")


@pytest.fixture(scope="module")
def teacher():
    model, _ = build_cifar_teacher("cifar10")
    return model


PAPER_W4A4 = GranQScheme.from_kwargs(4, 4, act_placement="paper", fused="eager")
CIFAR_EXAMPLE = (torch.zeros(1, 3, 32, 32),)


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def test_student_fake_quants_and_trainability(teacher):
    student = prepare_student(teacher, PAPER_W4A4, CIFAR_EXAMPLE)
    assert count_fake_quants(student) == {"weight": 22, "activation": 19}  # 21 convs + fc; 19 ReLUs
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


@pytest.mark.numerics
def test_student_without_fake_quant_is_the_teacher_and_bn_stays_frozen(teacher):
    torch.manual_seed(0)
    student = prepare_student(teacher, PAPER_W4A4, CIFAR_EXAMPLE)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = teacher(x)
        quantized = student(x)
        student.apply(disable_fake_quant)
        plain = student(x)
    student.apply(enable_fake_quant)
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-4)
    assert (quantized - expected).abs().max() > 1e-3  # quantization does change the output
    before = bn_buffers(student)
    student.train()  # even in train mode the frozen BN keeps its running statistics
    student(x * 3 + 1).sum().backward()
    after = bn_buffers(student)
    assert before.keys() == after.keys() and len(before) >= 21
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.fixture(scope="module")
def random_resnet20():
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    return get_model("resnet20_cifar10", pretrained=False).eval()


@pytest.mark.parametrize("toolchain, counts", [("fx", {"weight": 22, "activation": 19}),
                                               ("pt2e", {"weight": 22, "activation": 19}),
                                               ("modelopt", {"weight": 22, "activation": 21})])
def test_each_integration_offers_the_student_protocol(random_resnet20, toolchain, counts):
    """The lookup returns the integration's protocol object; its quantizer lists, count, train/eval
    handling and float switch work on the student it prepares (ResNet-20, paper placement)."""
    pytest.importorskip({"fx": "torch", "pt2e": "torchao", "modelopt": "modelopt"}[toolchain])
    from granq_ao.student_protocol import StudentProtocol
    from granq_ao.zsq.student import student_protocol

    protocol = student_protocol(toolchain)
    assert isinstance(protocol, StudentProtocol) and protocol.toolchain == toolchain
    student = protocol.prepare(random_resnet20, PAPER_W4A4, (torch.zeros(2, 3, 32, 32),))
    assert protocol.count(student) == counts == count_fake_quants(student, toolchain)
    activations, weights = protocol.activation_quantizers(student), protocol.weight_quantizers(student)
    assert len(weights) == 22 and not set(activations) & set(weights)
    assert all(dict(student.named_modules())[name] is module for name, module in activations.items())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        quantized = student(x)
        with protocol.quantizers_off(student):
            plain = student(x)
        assert torch.equal(student(x), quantized)  # switched back on
    torch.testing.assert_close(plain, random_resnet20(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(quantized, plain, rtol=1e-3, atol=1e-3)
    assert protocol.set_training(student, True).training and not protocol.set_training(student, False).training
    with pytest.raises(ValueError, match="toolchain"):
        student_protocol("tensorrt")


def test_every_toolchain_draws_the_same_activation_errors(random_resnet20):
    """The activation-error record (activation_error.json / .png) of the fx, pt2e and modelopt
    students of one teacher: one point per ReLU output (19 in ResNet-20; modelopt's shortcut conv
    and the pooling quantize a tensor another quantizer already saw), and, the quantizers being
    off, the same float activations, so errors equal up to float rounding of the convs."""
    pytest.importorskip("torchao")
    pytest.importorskip("modelopt")
    from granq_ao.zsq import pictures
    from granq_ao.zsq.student import student_protocol

    torch.manual_seed(1)
    images = torch.randn(8, 3, 32, 32)
    records = {}
    for toolchain in ("fx", "pt2e", "modelopt"):
        protocol = student_protocol(toolchain)
        student = protocol.prepare(random_resnet20, PAPER_W4A4, (torch.zeros(2, 3, 32, 32),))
        records[toolchain] = pictures.activation_errors(student, images, 4, protocol=protocol)
        assert not student.training and protocol.count(student)["activation"] >= 19
    for toolchain, record in records.items():
        assert len(record["layers"]) == len(record["granq"]) == len(record["tensor"]) == 19, toolchain
        assert len(set(record["modules"])) == 19 and record["n_images"] == 8 and record["bits"] == 4
        for granularity in ("tensor", "granq"):
            assert all(0 < e < 1 for e in record[granularity]), (toolchain, granularity)
            torch.testing.assert_close(torch.tensor(record[granularity]), torch.tensor(records["fx"][granularity]),
                                       rtol=1e-3, atol=0)
    assert records["pt2e"]["layers"][0].startswith("relu") and records["fx"]["layers"][0] == "features.init_block.conv"
    assert records["modelopt"]["modules"][0] == "features.stage1.unit1.body.conv1.conv.input_quantizer"
