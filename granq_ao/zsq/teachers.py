"""Teachers for the zero-shot recipes: pytorchcv CIFAR ResNet-20, built and loaded, frozen.

``build_cifar_teacher("cifar10")`` builds ``pytorchcv.model_provider.get_model("resnet20_cifar10",
pretrained=False)`` and loads a state dict (pytorchcv key names) from, in order:

1. the ``weights`` path given;
2. ``<data dir>/weights/resnet20_<dataset>.pth`` when present (``<data dir>`` = ``$GRANQ_DATA_DIR``
   or ``<repo>/../shared/data``);
3. otherwise pytorchcv's own pretrained download (``pretrained=True``; needs the internet).

The teacher expects normalized images (see :mod:`granq_ao.data`). It is returned frozen: eval
mode, ``requires_grad=False`` on every parameter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Tuple

import torch
from torch import nn

from .data import DATASETS, NUM_CLASSES, shared_data_dir

__all__ = ["TeacherError", "default_teacher_weights", "build_cifar_teacher", "freeze", "classifier_classes"]


class TeacherError(ValueError):
    """The teacher cannot be built as asked (missing file, wrong dataset pairing, bad state dict)."""


def default_teacher_weights(dataset: str) -> Path:
    """``<data dir>/weights/resnet20_<dataset>.pth`` (it may not exist)."""
    return shared_data_dir() / "weights" / f"resnet20_{dataset}.pth"


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns ``model``."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def classifier_classes(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Number of classes of a pytorchcv CIFAR ResNet state dict (rows of ``output.weight``)."""
    weight = state_dict.get("output.weight")
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


def build_cifar_teacher(dataset: str, weights: Optional[str] = None, allow_download: bool = True
                        ) -> Tuple[nn.Module, str]:
    """``(frozen teacher, description of where its weights came from)``.

    Raises :class:`TeacherError` when the weights file is missing or unreadable, when its
    classifier does not match ``dataset`` (e.g. a 100-class file with ``cifar10``), or when
    no local file exists and ``allow_download`` is False (or the download fails).
    """
    if dataset not in DATASETS:
        raise TeacherError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    name = f"resnet20_{dataset}"
    num_classes = NUM_CLASSES[dataset]
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TeacherError(f"teacher weights file not found: {path}")
    else:
        path = default_teacher_weights(dataset)
        if not path.is_file():
            if not allow_download:
                raise TeacherError(
                    f"no teacher weights at {path} and downloading is off; pass --teacher-weights FILE "
                    f"or set GRANQ_DATA_DIR")
            try:
                model = get_model(name, pretrained=True)
            except Exception as error:
                raise TeacherError(
                    f"no teacher weights at {path}, and pytorchcv's pretrained download of {name} failed "
                    f"({type(error).__name__}: {error}); pass --teacher-weights FILE") from error
            return freeze(model), f"pytorchcv pretrained {name}"
    state_dict = _read_state_dict(path)
    found = classifier_classes(state_dict)
    if found is None:
        raise TeacherError(f"{path} is not a pytorchcv CIFAR ResNet-20 state dict (no 'output.weight')")
    if found != num_classes:
        other = {n: d for d, n in NUM_CLASSES.items()}.get(found, f"a {found}-class dataset")
        raise TeacherError(
            f"teacher weights {path} have a {found}-class classifier (output.weight "
            f"{tuple(state_dict['output.weight'].shape)}), i.e. they are for {other}, but the dataset "
            f"is {dataset} ({num_classes} classes)")
    model = get_model(name, pretrained=False)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise TeacherError(f"{path} does not fit pytorchcv's {name}: {error}") from error
    return freeze(model), str(path)
