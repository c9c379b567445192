"""The CIFAR teachers of ../shared/data (granq_ao.zsq.teachers.CIFAR_TEACHERS): each definition loads its
file strictly and scores the subset exactly as SOURCES.md says; --arch pairing and missing-file errors;
the public-download path (exercised with the local file); the generator's output statistics per
teacher input space; the recipe with a teacher in raw-pixel space."""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from granq_ao.zsq.cifar_models import MobileNetV2Cifar, ResNet8Tiny, ResNetCifarA, make_divisible
from granq_ao.zsq.data import CIFAR_NORMALIZATION, generator_output_statistics, load_cifar_test, shared_data_dir
from granq_ao.zsq.evaluation import evaluate_accuracy
from granq_ao.zsq.generator import GDFQGenerator
from granq_ao.zsq.teachers import CIFAR_TEACHERS, TeacherError, build_cifar_teacher, cifar_teacher

REPO = Path(__file__).resolve().parents[1]
DATA = shared_data_dir()
# SOURCES.md: top-1 on the 1017-image CIFAR-10 subset, and parameter counts
EXPECTED = {"resnet20": (946, 272474), "resnet20a": (932, None), "resnet32a": (944, 464154),
            "resnet44a": (950, 658586), "resnet56a": (943, 853018), "mobilenetv2_x0_5": (935, 590410),
            "resnet8_tiny": (895, 78186)}


def _have(arch):
    return (DATA / "weights" / CIFAR_TEACHERS[arch].files["cifar10"]).is_file() and \
        (DATA / "cifar10" / "test_subset.npz").is_file()


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_each_teacher_loads_strictly_and_scores_the_subset_as_sources_md_says(arch):
    if not _have(arch):
        pytest.skip("offline teacher or subset not available")
    teacher, source = build_cifar_teacher("cifar10", arch=arch, allow_download=False)
    assert source.endswith(CIFAR_TEACHERS[arch].files["cifar10"])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    correct_expected, params = EXPECTED[arch]
    if params is not None:
        assert sum(p.numel() for p in teacher.parameters()) == params
    evalset = load_cifar_test("cifar10", normalization=cifar_teacher(arch).normalization("cifar10"))
    assert evaluate_accuracy(teacher, evalset, batch_size=256) == (correct_expected, 1017)


def test_definitions_match_the_described_topologies():
    assert [make_divisible(c * 0.5) for c in (32, 16, 24, 32, 64, 96, 160, 320, 1280)] == \
        [16, 8, 16, 16, 32, 48, 80, 160, 640]
    mobilenet = MobileNetV2Cifar(0.5)
    depthwise = [m for m in mobilenet.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(mobilenet.blocks) == 17 and len(depthwise) == 17
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in mobilenet.modules()) == 52
    for depth, blocks in ((20, 3), (56, 9)):
        model = ResNetCifarA(depth)
        assert len(model.layer1) == blocks
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == depth - 1
    # option A shortcut: subsampled input and zero channels, no parameters
    block = ResNetCifarA(20).layer2[0]
    x = torch.randn(2, 16, 8, 8)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, 32, 4, 4) and list(block.shortcut.parameters()) == []
    assert torch.equal(shortcut[:, 8:24], x[:, :, ::2, ::2]) and not shortcut[:, :8].any() and not shortcut[:, 24:].any()
    tiny = ResNet8Tiny()
    assert all(m.bias is not None for m in tiny.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(m.eps == 1e-3 for m in tiny.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert tiny(torch.rand(2, 3, 32, 32) * 255).shape == (2, 10)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNetCifarA(21)


def test_pairing_and_missing_files_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(TeacherError, match="mobilenetv2_x0_5 is a cifar10 teacher.*--dataset cifar10"):
        cifar_teacher("mobilenetv2_x0_5", "cifar100")
    with pytest.raises(TeacherError, match="unknown teacher architecture 'vgg'.*resnet8_tiny"):
        cifar_teacher("vgg")
    monkeypatch.setenv("GRANQ_DATA_DIR", str(tmp_path))
    with pytest.raises(TeacherError, match="no teacher weights at .*resnet8_tinymlperf_cifar10.pth.*no public download"):
        build_cifar_teacher("cifar10", arch="resnet8_tiny")
    with pytest.raises(TeacherError, match="downloading is off"):
        build_cifar_teacher("cifar10", arch="resnet56a", allow_download=False)
    with pytest.raises(TeacherError, match="not found"):
        build_cifar_teacher("cifar10", str(tmp_path / "nope.pth"), arch="resnet56a")


def test_a_file_of_another_architecture_is_refused_naming_it():
    if not _have("resnet8_tiny"):
        pytest.skip("offline teacher not available")
    path = DATA / "weights" / CIFAR_TEACHERS["resnet8_tiny"].files["cifar10"]
    with pytest.raises(TeacherError, match="not a mobilenetv2_x0_5 state dict"):
        build_cifar_teacher("cifar10", str(path), arch="mobilenetv2_x0_5")


def test_public_download_path_of_option_a_resnets(tmp_path, monkeypatch):
    """No file in the data folder: the akamaster URL is fetched into torch's hub cache and loaded
    (the downloader is replaced by a copy of the offline file, the wrapper dict and 'module.' kept)."""
    if not _have("resnet20a"):
        pytest.skip("offline teacher not available")
    local = DATA / "weights" / "resnet20_cifar10_padshortcut.th"
    monkeypatch.setenv("GRANQ_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    urls = []

    def fake_download(url, dst, progress=True):
        urls.append(url)
        shutil.copy(local, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    teacher, source = build_cifar_teacher("cifar10", arch="resnet20a")
    assert urls == [source] and source.endswith("pretrained_models/resnet20-12fca82f.th")
    assert (tmp_path / "hub" / "checkpoints" / "resnet20-12fca82f.th").is_file()
    reference, _ = build_cifar_teacher("cifar10", str(local), arch="resnet20a")
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), reference.state_dict().values()))
    build_cifar_teacher("cifar10", arch="resnet20a")  # cached: no second download
    assert len(urls) == 1


def test_generator_output_statistics_map_standardized_images_into_each_teacher_space():
    assert generator_output_statistics("cifar10", cifar_teacher("resnet20").normalization("cifar10")) is None
    assert generator_output_statistics("cifar10", cifar_teacher("mobilenetv2_x0_5").normalization("cifar10")) is None
    mean, std = generator_output_statistics("cifar10", cifar_teacher("resnet8_tiny").normalization("cifar10"))
    data_mean, data_std = CIFAR_NORMALIZATION["cifar10"]
    assert all(math.isclose(m, 255 * d, rel_tol=1e-9) for m, d in zip(mean, data_mean))
    assert all(math.isclose(s, 255 * d, rel_tol=1e-9) for s, d in zip(std, data_std))
    mean_a, std_a = generator_output_statistics("cifar10", cifar_teacher("resnet56a").normalization("cifar10"))
    assert math.isclose(mean_a[0], (0.4914 - 0.485) / 0.229) and math.isclose(std_a[2], 0.2616 / 0.225)
    # the generator's images have those per-channel statistics (its last BN standardizes the batch)
    torch.manual_seed(0)
    generator = GDFQGenerator(10, output_stats=(mean, std)).train()
    images = generator(*generator.sample_inputs(64))
    assert torch.allclose(images.mean(dim=(0, 2, 3)), torch.tensor(mean), atol=1e-2)
    assert torch.allclose(images.std(dim=(0, 2, 3), unbiased=False), torch.tensor(std), rtol=1e-3)
    plain = GDFQGenerator(10)
    assert "output_mean" not in plain.state_dict()  # the default generator's checkpoint keys are unchanged
    with pytest.raises(ValueError, match="3 values each"):
        GDFQGenerator(10, output_stats=((0.0,), (1.0,)))


def test_recipe_refuses_a_teacher_of_another_dataset_before_any_work(tmp_path):
    command = [sys.executable, str(REPO / "recipes" / "zsq_cifar.py"), "--arch", "resnet56a", "--dataset", "cifar100",
               "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "--arch resnet56a: resnet56a is a cifar10 teacher" in last and "--dataset cifar10" in last
    assert not (tmp_path / "run").exists()


def test_zero_shot_qat_takes_a_raw_pixel_teacher_with_its_generator_space():
    """The library path of the recipe's --arch resnet8_tiny: evaluation in the teacher's own space
    (raw pixels), the generator's images mapped there; the BN-statistics loss then sees inputs of
    the scale the teacher's stem BN was trained on."""
    if not _have("resnet8_tiny"):
        pytest.skip("offline teacher not available")
    from granq_ao.zsq import ZSQConfig, zero_shot_qat

    spec = cifar_teacher("resnet8_tiny")
    teacher, _ = build_cifar_teacher("cifar10", arch="resnet8_tiny", allow_download=False)
    evalset = load_cifar_test("cifar10", normalization=spec.normalization("cifar10"))
    assert 0 <= float(evalset.images.min()) and float(evalset.images.max()) <= 255.0001  # raw pixels
    assert evalset.statistics == spec.normalization("cifar10")  # the pictures de-normalize with it
    small = torch.utils.data.TensorDataset(evalset.images[:32], evalset.labels[:32])
    stats = generator_output_statistics("cifar10", spec.normalization("cifar10"))
    config = ZSQConfig(epochs=1, iters_per_epoch=2, batch_size=8, warmup_epochs=0, eval_batch_size=32, seed=0)
    torch.manual_seed(0)
    student, results = zero_shot_qat(teacher, config, num_classes=10, image_size=32, eval_data=small,
                                     generator=GDFQGenerator(10, output_stats=stats), tensorboard=False,
                                     progress=False, log=lambda message: None, fused="eager")
    with torch.no_grad():
        expected = int((teacher(small.tensors[0]).argmax(1) == small.tensors[1]).sum())
    assert results["correct"]["teacher"] == expected >= 24
    assert results["fake_quants"] == {"weight": 10, "activation": 7}
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_recipe_refuses_a_missing_teacher_file_before_any_work(tmp_path):
    command = [sys.executable, str(REPO / "recipes" / "zsq_cifar.py"), "--arch", "resnet8_tiny", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "GRANQ_DATA_DIR": str(tmp_path / "nothing")})
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "no teacher weights at" in last and "resnet8_tinymlperf_cifar10.pth" in last and "--teacher-weights" in last
    assert not (tmp_path / "run").exists()
