"""CUDA checks (skipped without a GPU; run by scripts/gpu_check.sh): the compiled (Triton) fake-quant step
equals the eager one bit for bit, and one zero-shot iteration runs on the GPU with and without fold_bn."""
import pytest
import torch

from granq_ao.functional import fake_quantize

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("granularity", ["granq", "channel", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(200, 16, 32, 32), (7, 5, 3), (16, 64, 8, 8)])
@pytest.mark.parametrize("bits", [3, 4])
def test_compiled_equals_eager_bit_for_bit_on_cuda(granularity, dtype, shape, bits):
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=generator).relu().to(dtype)
    eager = fake_quantize(x, bits, granularity, fused="eager")
    compiled = fake_quantize(x, bits, granularity, fused="compiled")
    assert eager.dtype == compiled.dtype == dtype
    assert torch.equal(eager, compiled)


@cuda
def test_cuda_matches_cpu_eager_on_exact_grid():
    """Values on a dyadic grid make every division exact: the GPU and the CPU agree bit for bit."""
    x = (torch.randint(0, 64, (8, 16, 6, 6)).float() / 8).cuda()
    assert torch.equal(fake_quantize(x, 3, fused="compiled").cpu(), fake_quantize(x.cpu(), 3, fused="eager"))


@cuda
@pytest.mark.parametrize("fold_bn", [False, True])
def test_one_zero_shot_iteration_on_cuda(fold_bn):
    from granq_ao.zsq.distributed import DistributedContext
    from granq_ao.zsq.trainer import ZSQConfig, ZSQTrainer

    try:
        from granq_ao.zsq.teachers import build_cifar_teacher

        teacher, _ = build_cifar_teacher("cifar10", allow_download=False)
    except Exception as error:
        pytest.skip(f"offline teacher not available: {error}")
    config = ZSQConfig(weight_bits=3, act_bits=3, batch_size=16, epochs=1, iters_per_epoch=1, warmup_epochs=0,
                       fold_bn=fold_bn)
    trainer = ZSQTrainer(config, teacher, None, num_classes=10, context=DistributedContext.from_env("cuda"),
                         tensorboard=False, progress=False, log=lambda _: None, fused="compiled")
    step = trainer.train_step(torch.Generator(device="cuda").manual_seed(0), train_student=True)
    assert all(torch.isfinite(torch.tensor(v)) for v in step.values())
    assert next(trainer.student.parameters()).is_cuda
