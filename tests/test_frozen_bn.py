"""BN folding for the zero-shot student (issue 13): when weight quantization commutes with a per-channel
BN scale, and the opt-in ``fold_bn`` student (frozen BN folded into each conv's forward) against the
default torch.ao conv-bn QAT simulation."""
import copy

import pytest
import torch

from granq_ao.config import GranQConfig, GranQScheme
from granq_ao.functional import fake_quantize
from granq_ao.integrations.torch_ao.frozen_bn import fold_frozen_batchnorm, is_folded, unfold_frozen_batchnorm
from granq_ao.zsq.student import prepare_student
from granq_ao.zsq.trainer import ZSQConfig


def weight_fq(w, granularity, bits=3):
    return fake_quantize(w, GranQConfig.for_weight(bits, granularity, fused="eager"))


# ----------------------------------------------------------------------------- the algebra
@pytest.mark.parametrize("granularity", ["channel", "kernel"])
def test_positive_power_of_two_channel_scale_commutes_exactly(granularity):
    """fq(w * a) == fq(w) * a bit for bit when a > 0 per output channel is a power of two (no
    float rounding anywhere): min/max, step and codes all scale with a, the zero point does not."""
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    a = (2.0 ** torch.randint(-3, 4, (8,)).float()).view(-1, 1, 1, 1)
    assert torch.equal(weight_fq(w * a, granularity), weight_fq(w, granularity) * a)


@pytest.mark.numerics
@pytest.mark.parametrize("granularity", ["channel", "kernel"])
def test_positive_general_channel_scale_commutes_up_to_rounding(granularity):
    """Any a > 0: equal in real arithmetic; in float a code flips only where x/s + z lands within an
    ulp of a rounding boundary (here: none or a handful of 4608 weights)."""
    torch.manual_seed(1)
    w = torch.randn(16, 32, 3, 3)
    a = (torch.rand(16) * 2 + 0.05).view(-1, 1, 1, 1)
    lhs, rhs = weight_fq(w * a, granularity), weight_fq(w, granularity) * a
    step = ((w * a).amax() - (w * a).amin()) / 7
    off = (lhs - rhs).abs() > 1e-5 * step
    assert off.float().mean() < 1e-3
    assert torch.allclose(lhs, rhs, atol=float(step) * 1.01)  # a flip moves a value by one step at most


@pytest.mark.numerics
def test_negative_scale_commutes_except_at_rounding_ties():
    """a < 0 swaps min and max: the grid is the same set (mirrored), but round-half-to-even is not
    mirror-symmetric around the zero point, so an exact tie rounds the other way."""
    # one output channel, 3 bits: min 0, max 7 -> step 1, zero point 0; 2.5 is an exact tie
    w = torch.tensor([0.0, 2.5, 3.2, 7.0]).view(1, 4, 1, 1)
    plain = weight_fq(w, "channel")
    mirrored = -weight_fq(-w, "channel")
    assert plain.flatten().tolist() == [0.0, 2.0, 3.0, 7.0]      # round(2.5) = 2 (half to even)
    assert mirrored.flatten().tolist() == [0.0, 3.0, 3.0, 7.0]   # round(7 - 2.5) = round(4.5) = 4 -> 7 - 4 = 3
    # away from ties, a negative scale commutes too
    torch.manual_seed(2)
    v = torch.randn(8, 4, 3, 3)
    a = -(2.0 ** torch.randint(-2, 3, (8,)).float()).view(-1, 1, 1, 1)
    lhs, rhs = weight_fq(v * a, "channel"), weight_fq(v, "channel") * a
    assert (lhs != rhs).float().mean() < 0.01


def test_per_tensor_weights_do_not_commute():
    """One range for the whole tensor: scaling one channel by 10 coarsens every other channel's grid."""
    torch.manual_seed(3)
    w = torch.rand(2, 4, 3, 3)
    a = torch.tensor([1.0, 10.0]).view(-1, 1, 1, 1)
    lhs, rhs = weight_fq(w * a, "tensor") / a, weight_fq(w, "tensor")
    assert (lhs[0] - w[0]).abs().max() > 3 * (rhs[0] - w[0]).abs().max()


# ----------------------------------------------------------------------------- the student
def _teacher_with_negative_gammas():
    from granq_ao.zsq.teachers import build_cifar_teacher

    try:
        teacher, _ = build_cifar_teacher("cifar10", allow_download=False)
    except Exception as error:
        pytest.skip(f"offline teacher not available: {error}")
    teacher = copy.deepcopy(teacher)
    with torch.no_grad():  # a negative BN scale in two layers (the fold must not assume gamma > 0)
        teacher.features.stage1.unit1.body.conv1.bn.weight[:3].neg_()
        teacher.features.stage2.unit1.identity_conv.bn.weight[::2].neg_()
    return teacher


@pytest.fixture(scope="module")
def students():
    teacher = _teacher_with_negative_gammas()
    example = (torch.zeros(1, 3, 32, 32),)
    scheme = GranQScheme.from_kwargs(3, 3, act_placement="paper", fused="eager")
    torch.manual_seed(0)
    default = prepare_student(teacher, scheme, example)
    torch.manual_seed(0)
    folded = prepare_student(teacher, scheme, example, fold_bn=True)
    return teacher, default, folded


def _images(n=32):
    from granq_ao.zsq.data import load_cifar_test

    try:
        return load_cifar_test("cifar10").images[:n]
    except Exception:
        return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_fold_is_opt_in_and_keeps_modules_and_state(students):
    _, default, folded = students
    assert ZSQConfig().fold_bn is False
    assert not any(is_folded(m) for m in default.modules())
    folded_modules = [name for name, m in folded.named_modules() if is_folded(m)]
    assert len(folded_modules) == 21  # ResNet-20: stem + 18 body convs + 2 1x1 shortcut convs, each with BN
    assert [type(m) for m in default.modules()][1:] == [type(m) for m in folded.modules()][1:]  # [0]: per-trace GraphModule class
    assert default.state_dict().keys() == folded.state_dict().keys()
    with pytest.raises(ValueError, match="fold_bn"):
        ZSQConfig(fold_bn="yes").validate()


@pytest.mark.numerics
def test_folded_student_computes_the_same_function_and_gradients(students):
    """The fold is exact in real arithmetic, so it is checked in float64: there both students agree
    to rounding error (measured ~4e-16 relative), with every fake-quant on. (In float32, which ulps
    differ depends on the CPU's conv kernels, and a 3-bit rounding turns a one-ulp difference into a
    whole step that later layers amplify: 0.029 to 0.033 relative on the logits, by ISA.)"""
    _, default, folded = students
    default, folded = copy.deepcopy(default).double().eval(), copy.deepcopy(folded).double().eval()
    images = _images().double()
    out_default, out_folded = default(images), folded(images)
    assert torch.equal(out_default.argmax(1), out_folded.argmax(1))
    rel = (out_default - out_folded).norm() / out_default.norm()
    assert rel < 1e-9, rel
    weights = torch.randn(out_default.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads_default = torch.autograd.grad((out_default * weights).sum(), list(default.parameters()))
    grads_folded = torch.autograd.grad((out_folded * weights).sum(), list(folded.parameters()))
    names = [name for name, _ in default.named_parameters()]
    assert len(names) == len(grads_folded) > 0
    for name, g_d, g_f in zip(names, grads_default, grads_folded):
        assert (g_d - g_f).norm() <= 1e-9 * g_d.norm() + 1e-12, name


@pytest.mark.numerics
def test_folded_forward_is_the_conv_bn_map_without_activation_quantization(students):
    """With activation fake-quants off nothing downstream rounds: the two forwards agree to float precision."""
    _, default, folded = students
    images = _images(8)
    from torch.ao.quantization import disable_fake_quant, enable_fake_quant

    for model in (default, folded):
        for name, module in model.named_modules():
            if hasattr(module, "fake_quant_enabled") and not name.endswith("weight_fake_quant"):
                disable_fake_quant(module)
    try:
        assert torch.allclose(default(images), folded(images), rtol=1e-4, atol=1e-4)
    finally:
        default.apply(enable_fake_quant), folded.apply(enable_fake_quant)


@pytest.mark.numerics
def test_unfold_restores_torch_ao_forward_bit_for_bit(students):
    teacher, default, _ = students
    images = _images(8)
    scheme = GranQScheme.from_kwargs(3, 3, act_placement="paper", fused="eager")
    torch.manual_seed(0)
    student = prepare_student(teacher, scheme, (torch.zeros(1, 3, 32, 32),), fold_bn=True)
    assert unfold_frozen_batchnorm(student) == 21
    assert torch.equal(student(images), default(images))
    assert fold_frozen_batchnorm(copy.deepcopy(student)) == 21  # deep copies keep working


def test_training_mode_bn_keeps_torch_ao_forward(students):
    """A BN on batch statistics cannot be folded: the module falls back to torch.ao's forward."""
    _, _, folded = students
    module = next(m for m in folded.modules() if is_folded(m))
    overridden, plain = copy.deepcopy(module), copy.deepcopy(module)  # a train-mode call updates running stats
    del plain.__dict__["_forward_approximate"]
    assert is_folded(overridden) and not is_folded(plain)
    x = torch.randn(4, module.in_channels, 8, 8)
    overridden.bn.train(), plain.bn.train()
    assert torch.equal(overridden(x), plain(x))
    overridden.bn.eval(), plain.bn.eval()


def test_checkpoint_written_before_fold_bn_existed_still_resumes():
    """A checkpoint whose config has no ``fold_bn`` key was written with the default (False)."""
    from granq_ao.zsq.run_record import CHECKPOINT_FORMAT, check_resumable

    saved = ZSQConfig().to_dict()
    del saved["fold_bn"]
    checkpoint = {"format": CHECKPOINT_FORMAT, "config": saved, "run_info": {}, "world_size": 1}

    check_resumable(checkpoint, ZSQConfig(), {}, 1)  # no error
    with pytest.raises(ValueError, match="fold_bn"):
        check_resumable(checkpoint, ZSQConfig(fold_bn=True), {}, 1)
