"""Teachers for the zero-shot CIFAR recipe, built and loaded, frozen: :data:`CIFAR_TEACHERS`.

``build_cifar_teacher(dataset, arch="resnet20")`` builds the architecture ``arch`` and loads a state
dict from, in order:

1. the ``weights`` path given;
2. ``<data dir>/weights/<file of arch and dataset>`` when present (``<data dir>`` = ``$GRANQ_DATA_DIR``
   or ``<repo>/../shared/data``);
3. otherwise the architecture's public download, where it has one (pytorchcv's ``pretrained=True``
   for ``resnet20``; the akamaster/pytorch_resnet_cifar10 files for the option-A ResNets; needs the
   internet).

Each teacher has its own input normalization (:attr:`CifarTeacher.normalization`: ``(mean, std)``
applied to pixels scaled to [0, 1]); ResNet-8 of MLPerf Tiny takes raw 0..255 pixels, i.e.
mean 0 and std 1/255. It is returned frozen: eval mode, ``requires_grad=False`` on every parameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .cifar_models import MobileNetV2Cifar, ResNet8Tiny, ResNetCifarA
from .data import (CIFAR_NORMALIZATION, DATASETS, NUM_CLASSES, Normalization, generator_output_statistics,
                   shared_data_dir)
from .generator import GDFQGenerator

__all__ = ["TeacherError", "CifarTeacher", "CIFAR_TEACHERS", "cifar_teacher", "default_teacher_weights",
           "build_cifar_teacher", "locate_teacher_weights", "teacher_generator", "freeze", "classifier_classes"]


class TeacherError(ValueError):
    """The teacher cannot be built as asked (missing file, wrong dataset pairing, bad state dict)."""


IMAGENET_STATS: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RAW_PIXELS: Normalization = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))  # x_teacher = 255 * x


@dataclass(frozen=True)
class CifarTeacher:
    """One CIFAR teacher architecture: how to build it, where its weights are, what it takes.

    ``files`` maps each dataset it has weights for to the file name under ``<data dir>/weights``;
    ``urls`` (optional) to a public download of the same weights; ``normalization`` is its input
    normalization for a dataset (``(mean, std)`` on pixels in [0, 1]); ``classifier_key`` names the
    final layer's weight in its state dict (checked against the dataset's classes)."""

    arch: str
    description: str
    build: Callable[[int], nn.Module]
    files: Mapping[str, str]
    classifier_key: str
    fixed_normalization: Optional[Normalization] = None  # None: the dataset's own CIFAR statistics
    urls: Mapping[str, str] = None  # type: ignore[assignment]

    def normalization(self, dataset: str) -> Normalization:
        return self.fixed_normalization or CIFAR_NORMALIZATION[dataset]


def _pytorchcv_resnet20(num_classes: int) -> nn.Module:
    return get_model(f"resnet20_cifar{num_classes}", pretrained=False)


def _option_a(depth: int) -> CifarTeacher:
    file = "resnet20_cifar10_padshortcut.th" if depth == 20 else f"resnet{depth}_cifar10_padshortcut.pth"
    hashes = {20: "12fca82f", 32: "d509ac18", 44: "014dd654", 56: "4bfd9763"}
    url = ("https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
           f"resnet{depth}-{hashes[depth]}.th")
    return CifarTeacher(f"resnet{depth}a", f"ResNet-{depth}, zero-padding (option A) shortcuts",
                        lambda classes: ResNetCifarA(depth, classes), {"cifar10": file}, "linear.weight",
                        IMAGENET_STATS, {"cifar10": url})


CIFAR_TEACHERS: Dict[str, CifarTeacher] = {
    "resnet20": CifarTeacher("resnet20", "pytorchcv ResNet-20 (1x1-conv shortcuts)", _pytorchcv_resnet20,
                             {d: f"resnet20_{d}.pth" for d in DATASETS}, "output.weight"),
    **{f"resnet{depth}a": _option_a(depth) for depth in (20, 32, 44, 56)},
    "mobilenetv2_x0_5": CifarTeacher("mobilenetv2_x0_5", "MobileNetV2 width 0.5 (depthwise convs, ReLU6)",
                                     lambda classes: MobileNetV2Cifar(0.5, classes),
                                     {"cifar10": "mobilenetv2_x0_5_cifar10.pth"}, "linear.weight"),
    "resnet8_tiny": CifarTeacher("resnet8_tiny", "MLPerf Tiny ResNet-8 (biased convs, raw 0..255 pixels)",
                                 ResNet8Tiny, {"cifar10": "resnet8_tinymlperf_cifar10.pth"}, "fc.weight",
                                 RAW_PIXELS),
}
CIFAR_ARCHS = tuple(CIFAR_TEACHERS)


def cifar_teacher(arch: str, dataset: str = "cifar10") -> CifarTeacher:
    """The :class:`CifarTeacher` ``arch``; :class:`TeacherError` (one line) for an unknown
    architecture, an unknown dataset, or a dataset it has no weights for."""
    if arch not in CIFAR_TEACHERS:
        raise TeacherError(f"unknown teacher architecture {arch!r}; expected one of {', '.join(CIFAR_ARCHS)}")
    if dataset not in DATASETS:
        raise TeacherError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    spec = CIFAR_TEACHERS[arch]
    if dataset not in spec.files:
        raise TeacherError(f"{arch} is a {'/'.join(spec.files)} teacher; there are no {dataset} weights for it "
                           f"(use --dataset {next(iter(spec.files))})")
    return spec


def teacher_generator(dataset: str, arch: str, latent_dim: int) -> Optional[GDFQGenerator]:
    """The GDFQ generator paired with teacher ``arch``: its standardized images mapped into the
    teacher's input space (:func:`~granq_ao.zsq.data.generator_output_statistics`), or ``None``
    where they already are that space (the trainer then builds its default generator)."""
    output_stats = generator_output_statistics(dataset, cifar_teacher(arch, dataset).normalization(dataset))
    if output_stats is None:
        return None
    return GDFQGenerator(NUM_CLASSES[dataset], latent_dim, img_size=32, output_stats=output_stats)


def default_teacher_weights(dataset: str, arch: str = "resnet20") -> Path:
    """``<data dir>/weights/<file>`` of ``arch`` for ``dataset`` (it may not exist)."""
    return shared_data_dir() / "weights" / cifar_teacher(arch, dataset).files[dataset]


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns ``model``."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def classifier_classes(state_dict: Mapping[str, torch.Tensor], key: str = "output.weight") -> Optional[int]:
    """Number of classes of a classifier's state dict (rows of ``key``, pytorchcv's ``output.weight``
    by default)."""
    weight = state_dict.get(key)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def get_model(name: str, pretrained: bool = False) -> nn.Module:
    """``pytorchcv.model_provider.get_model(name, pretrained=...)`` for the CIFAR ResNets, calling
    the same constructor directly (importing ``model_provider`` imports every pytorchcv model and
    torchvision: seconds); other names go through ``get_model``."""
    try:
        from pytorchcv.models import resnet_cifar

        constructor = getattr(resnet_cifar, name)
    except (ImportError, AttributeError):
        from pytorchcv.model_provider import get_model as provider_get_model

        return provider_get_model(name, pretrained=pretrained)
    return constructor(pretrained=pretrained)


def _read_state_dict(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TeacherError(f"cannot read teacher weights {path}: {type(error).__name__}: {error}") from error
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TeacherError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _download(spec: CifarTeacher, dataset: str, path: Path) -> Tuple[nn.Module, str]:
    """The architecture's public pretrained weights (module docstring, step 3)."""
    if spec.arch == "resnet20":
        try:
            return freeze(get_model(f"resnet20_{dataset}", pretrained=True)), f"pytorchcv pretrained resnet20_{dataset}"
        except Exception as error:
            raise TeacherError(f"no teacher weights at {path}, and pytorchcv's pretrained download of resnet20_{dataset} "
                               f"failed ({type(error).__name__}: {error}); pass --teacher-weights FILE") from error
    url = (spec.urls or {}).get(dataset)
    if url is None:
        raise TeacherError(f"no teacher weights at {path} and {spec.arch} has no public download; pass "
                           f"--teacher-weights FILE or set GRANQ_DATA_DIR")
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=False)
        except Exception as error:
            raise TeacherError(f"no teacher weights at {path}, and the download of {url} failed "
                               f"({type(error).__name__}: {error}); pass --teacher-weights FILE") from error
    return _load(spec, dataset, target), url


def _load(spec: CifarTeacher, dataset: str, path: Path) -> nn.Module:
    """``spec``'s model for ``dataset`` with the state dict in ``path`` loaded strictly, frozen."""
    num_classes = NUM_CLASSES[dataset]
    state_dict = _read_state_dict(path)
    found = classifier_classes(state_dict, spec.classifier_key)
    if found is None:
        raise TeacherError(f"{path} is not a {spec.arch} state dict (no {spec.classifier_key!r})")
    if found != num_classes:
        other = {n: d for d, n in NUM_CLASSES.items()}.get(found, f"a {found}-class dataset")
        raise TeacherError(
            f"teacher weights {path} have a {found}-class classifier ({spec.classifier_key} "
            f"{tuple(state_dict[spec.classifier_key].shape)}), i.e. they are for {other}, but the dataset "
            f"is {dataset} ({num_classes} classes)")
    model = spec.build(num_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise TeacherError(f"{path} does not fit {spec.arch} ({spec.description}): "
                           f"{' '.join(line.strip() for line in first[:3])}") from error
    return freeze(model)


def build_cifar_teacher(dataset: str, weights: Optional[str] = None, allow_download: bool = True,
                        arch: str = "resnet20") -> Tuple[nn.Module, str]:
    """``(frozen teacher, description of where its weights came from)`` for architecture ``arch``
    (:data:`CIFAR_TEACHERS`). The teacher takes images normalized with
    ``cifar_teacher(arch, dataset).normalization(dataset)``.

    Raises :class:`TeacherError` when ``arch`` has no weights for ``dataset``, when the weights file
    is missing or unreadable, when its classifier does not match ``dataset`` (e.g. a 100-class file
    with ``cifar10``) or its keys do not fit ``arch``, or when no local file exists and
    ``allow_download`` is False (or the download fails).
    """
    spec = cifar_teacher(arch, dataset)
    path = locate_teacher_weights(dataset, weights, allow_download, arch)
    if path is not None:
        return _load(spec, dataset, path), str(path)
    return _download(spec, dataset, default_teacher_weights(dataset, arch))


def locate_teacher_weights(dataset: str, weights: Optional[str] = None, allow_download: bool = True,
                           arch: str = "resnet20") -> Optional[Path]:
    """The local weights file :func:`build_cifar_teacher` would load, ``None`` when it would
    download them, or :class:`TeacherError` (one line) when neither is possible. Cheap: a recipe
    calls it before any work."""
    spec = cifar_teacher(arch, dataset)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TeacherError(f"teacher weights file not found: {path}")
        return path
    path = default_teacher_weights(dataset, arch)
    if path.is_file():
        return path
    if not allow_download:
        raise TeacherError(f"no teacher weights at {path} and downloading is off; pass --teacher-weights FILE "
                           f"or set GRANQ_DATA_DIR")
    if spec.arch != "resnet20" and not (spec.urls or {}).get(dataset):
        raise TeacherError(f"no teacher weights at {path} and {spec.arch} has no public download; pass "
                           f"--teacher-weights FILE or set GRANQ_DATA_DIR")
    return None
