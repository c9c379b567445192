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
