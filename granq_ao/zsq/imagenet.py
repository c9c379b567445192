"""ImageNet teachers and evaluation images for ``recipes/zsq_imagenet.py``.

Teachers (:func:`build_imagenet_teacher`), by ``arch``:

* ``resnet18``, ``resnet50``, ``mobilenetv2_w1`` (the paper's; any other pytorchcv model name
  works too): ``pytorchcv``'s ImageNet models, as the official code uses (FP top-1 71.47, 77.73,
  73.03 in the paper). A weights file is then a pytorchcv state dict (``output.weight`` ...).
* ``torchvision:NAME`` (e.g. ``torchvision:resnet18``): ``torchvision.models.get_model(NAME)``;
  a weights file is then a torchvision state dict (``fc.weight`` ...).

The weights come from ``weights`` (a state dict file; its classifier decides the number of
classes) or, without a file, from the provider's pretrained download (pytorchcv:
``~/.torch/models``; torchvision: ``$TORCH_HOME/hub``), which needs the internet unless cached.
pytorchcv's models end in ``AvgPool2d(7)``, which only fits 224 px inputs; for another
``image_size`` it is replaced by ``AdaptiveAvgPool2d(1)`` (the same function at 224 px).

Evaluation images (:func:`load_imagenet_val`): an ``ImageFolder`` in the ILSVRC2012 validation
layout (one folder per class named by its WordNet id, ``n01440764/`` ... ``n15075141/``, holding
that class's images; sorted folder names give the label indices the pretrained models use),
with the standard preprocessing scaled to ``image_size`` ``S``: resize the shorter side to
``round(S * 256 / 224)`` (256 for 224), center crop ``S``, to [0, 1]. The ImageNet mean/std
(:data:`IMAGENET_NORMALIZATION`) are applied by the trainer (its ``normalize``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from .data import DataNotFoundError
from .teachers import TeacherError, _read_state_dict, freeze

__all__ = ["IMAGENET_NORMALIZATION", "PAPER_ARCHS", "build_imagenet_teacher", "load_imagenet_val",
           "resize_for", "classifier_key"]

IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PAPER_ARCHS = ("resnet18", "resnet50", "mobilenetv2_w1")
TORCHVISION_PREFIX = "torchvision:"
PYTORCHCV_FAMILIES = ("resnet", "mobilenetv2")  # modules of pytorchcv.models looked in first
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


def resize_for(image_size: int) -> int:
    """The shorter-side resize before the center crop: ``round(image_size * 256 / 224)``."""
    return int(round(image_size * 256 / 224))


def _constructor(arch: str):
    """``(provider, build(pretrained, num_classes))`` for ``arch``; ``TeacherError`` if unknown."""
    if arch.startswith(TORCHVISION_PREFIX):
        name = arch[len(TORCHVISION_PREFIX):]
        try:
            import torchvision
        except ImportError as error:  # pragma: no cover - torchvision is a declared extra
            raise TeacherError(f"--arch {arch} needs torchvision (pip install torchvision)") from error
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise TeacherError(f"unknown torchvision classification model {name!r}; e.g. "
                               f"{', '.join(n for n in ('resnet18', 'resnet50', 'mobilenet_v2') if n in known)}")

        def build(pretrained: bool, num_classes: int = 1000) -> nn.Module:
            if pretrained:
                return torchvision.models.get_model(name, weights="DEFAULT")
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

        return "torchvision", build
    try:
        import pytorchcv  # noqa: F401
    except ImportError as error:  # pragma: no cover - pytorchcv is a declared extra
        raise TeacherError(f"--arch {arch} needs pytorchcv (pip install pytorchcv)") from error
    import importlib

    constructor = None
    for family in PYTORCHCV_FAMILIES:  # importing model_provider imports every pytorchcv model (8 s)
        module = importlib.import_module(f"pytorchcv.models.{family}")
        if arch in getattr(module, "__all__", ()):
            constructor = getattr(module, arch)
            break
    if constructor is None:
        from pytorchcv import model_provider

        models = getattr(model_provider, "_models", {})
        if arch not in models:
            raise TeacherError(f"unknown --arch {arch!r}: not a pytorchcv model (the paper's: "
                               f"{', '.join(PAPER_ARCHS)}) and not torchvision:NAME")
        constructor = models[arch]

    def build(pretrained: bool, num_classes: int = 1000) -> nn.Module:
        if pretrained:
            return constructor(pretrained=True)
        return constructor(pretrained=False, num_classes=num_classes)

    return "pytorchcv", build


def classifier_key(model: nn.Module, num_classes: int = 1000) -> Optional[str]:
    """The state-dict key of ``model``'s classifier weight: the last ``*.weight`` whose first
    dimension is ``num_classes`` (``output.weight`` in pytorchcv, ``fc.weight`` in a torchvision
    ResNet, ``classifier.1.weight`` in its MobileNetV2)."""
    keys = [k for k, v in model.state_dict().items() if k.endswith("weight") and v.dim() >= 2
            and v.shape[0] == num_classes]
    return keys[-1] if keys else None


def _fit_image_size(model: nn.Module, image_size: int) -> nn.Module:
    features = getattr(model, "features", None)
    pool = getattr(features, "final_pool", None) if isinstance(features, nn.Module) else None
    if image_size != 224 and isinstance(pool, nn.AvgPool2d):
        features.final_pool = nn.AdaptiveAvgPool2d(1)
    return model


def build_imagenet_teacher(arch: str, weights: Optional[str] = None, image_size: int = 224,
                           allow_download: bool = True) -> Tuple[nn.Module, str, int]:
    """``(frozen teacher, where its weights came from, number of classes)`` (module docstring).

    Raises :class:`~granq_ao.zsq.teachers.TeacherError` (one line) for an unknown ``arch``, a
    missing or unreadable file, a state dict of another architecture, a failed download, or a
    model that cannot take ``image_size`` images."""
    provider, build = _constructor(arch)
    if weights is None:
        if not allow_download:
            raise TeacherError(f"no --teacher-weights for {arch} and downloading is off")
        try:
            model = build(pretrained=True)
        except Exception as error:
            reason = str(error).splitlines()[0][:160] if str(error) else ""
            raise TeacherError(
                f"could not get {provider}'s pretrained {arch} weights ({type(error).__name__}: {reason}); "
                f"offline, pass --teacher-weights FILE (a {provider} state dict)") from None
        source = f"{provider} pretrained {arch}"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TeacherError(f"teacher weights file not found: {path}")
        state_dict = _read_state_dict(path)
        with torch.device("meta"):  # the architecture's key names, without allocating it
            probe = build(pretrained=False)
        key = classifier_key(probe)
        if key is None or key not in state_dict or state_dict[key].dim() < 2:
            raise TeacherError(f"{path} is not a {provider} {arch} state dict (no classifier {key!r})")
        num_classes = int(state_dict[key].shape[0])
        model = build(pretrained=False, num_classes=num_classes)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            first = " ".join(str(error).split())[:300]
            raise TeacherError(f"{path} does not fit {provider}'s {arch}: {first}") from None
        source = str(path)
    model = freeze(_fit_image_size(model, image_size))
    return model, source, _output_classes(model, arch, image_size)


def _output_classes(model: nn.Module, arch: str, image_size: int) -> int:
    """Classes the model predicts, from one forward pass of a zero image (which also checks
    that it takes ``image_size`` images)."""
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, image_size, image_size))
    except Exception as error:
        raise TeacherError(f"{arch} does not take {image_size}x{image_size} images "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:160]}); choose another "
                           f"--image-size") from None
    if logits.dim() != 2:
        raise TeacherError(f"{arch} returns {tuple(logits.shape)}-shaped output, not (N, classes) logits")
    return int(logits.shape[1])


def load_imagenet_val(val_dir: str, image_size: int = 224, subset: Optional[int] = None,
                      subset_seed: int = 0) -> Tuple[torch.utils.data.Dataset, int, str]:
    """``(dataset, number of classes, description)`` of the validation images in ``val_dir``.

    ``dataset`` yields ``(image in [0, 1] (3, S, S), label)`` (module docstring; not normalized).
    ``subset=N`` keeps N images chosen by a seeded permutation (``subset_seed``, independent of
    the run's seed), in folder order: the same images on every run and process.
    Raises :class:`~granq_ao.zsq.data.DataNotFoundError` (one line) when ``val_dir`` is missing
    or not in the class-folder layout."""
    try:
        from torchvision import datasets, transforms
    except ImportError as error:  # pragma: no cover - torchvision is a declared extra
        raise DataNotFoundError("reading ImageNet images needs torchvision (pip install torchvision)") from error
    root = Path(val_dir).expanduser()
    layout = ("expected the ILSVRC2012 val layout: one folder per class named by its WordNet id "
              "(n01440764/ ...) holding that class's images")
    if not root.is_dir():
        raise DataNotFoundError(f"--val-dir {root} does not exist or is not a folder ({layout})")
    flat = [p.name for p in root.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES]
    transform = transforms.Compose([transforms.Resize(resize_for(image_size)), transforms.CenterCrop(image_size),
                                    transforms.ToTensor()])
    try:
        dataset = datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        hint = (f"; it holds {len(flat)} images directly: sort them into class folders first (e.g. with "
                f"the ILSVRC2012 devkit's val labels)") if flat else ""
        message = " ".join(str(error).split())[:200]
        raise DataNotFoundError(f"--val-dir {root}: {message} ({layout}){hint}") from None
    total, classes = len(dataset), len(dataset.classes)
    description = f"ImageFolder:{root} ({total} images, {classes} classes"
    if subset is not None and subset < total:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(subset_seed))[:subset]
        dataset = torch.utils.data.Subset(dataset, sorted(order.tolist()))
        description += f"; subset of {subset} chosen with seed {subset_seed}"
    description += f"; resize {resize_for(image_size)}, center crop {image_size})"
    return dataset, classes, description
