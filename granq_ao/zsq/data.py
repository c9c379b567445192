"""CIFAR evaluation data for the zero-shot recipes, and accuracy intervals.

Images reach a model as ``x_norm = (x / 255 - mean) / std`` per channel (NCHW float32), with the
per-dataset ``mean``/``std`` of :data:`CIFAR_NORMALIZATION` (the statistics the teachers were
trained with). A generator's output is already in that normalized space and goes to the model
as it is; only real images are normalized here.

Two sources of real test images:

* the offline subset ``<data dir>/<dataset>/test_subset.npz`` (``x`` uint8 NHWC, ``y`` int64),
  where ``<data dir>`` is ``$GRANQ_DATA_DIR`` or ``<repo>/../shared/data`` (the default);
* the full official test set in torchvision's layout under ``data_root``
  (``torchvision.datasets.CIFAR10/100(root, train=False)``; it downloads only when asked).

Evaluation on them (fixed batches, Wilson intervals, paired McNemar tests) is
:mod:`granq_ao.zsq.evaluation`, which takes any evaluation data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "CIFAR_NORMALIZATION",
    "NUM_CLASSES",
    "DATASETS",
    "DataNotFoundError",
    "EvalSet",
    "shared_data_dir",
    "normalize_uint8_images",
    "load_cifar_test",
    "Normalization",
    "generator_output_statistics",
]

# ``(mean, std)`` per channel, applied to pixels scaled to [0, 1]: ``x_model = (x / 255 - mean) / std``.
Normalization = Tuple[Sequence[float], Sequence[float]]

DATASETS = ("cifar10", "cifar100")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
# (mean, std) per RGB channel, applied after scaling pixels to [0, 1].
CIFAR_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class DataNotFoundError(FileNotFoundError):
    """No evaluation images where they were looked for (the message says where and what to do)."""


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


def shared_data_dir() -> Path:
    """``$GRANQ_DATA_DIR`` if set, else ``<repo>/../shared/data`` (repo = the folder holding the
    ``granq_ao`` package)."""
    env = os.environ.get("GRANQ_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def normalize_uint8_images(x_uint8_nhwc: np.ndarray, dataset: str,
                           normalization: Optional[Normalization] = None) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW tensor ``(x / 255 - mean) / std``, with the dataset's
    statistics (:data:`CIFAR_NORMALIZATION`) unless ``normalization`` gives a teacher's own."""
    _check_dataset(dataset)
    x = torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc)).permute(0, 3, 1, 2).float().div_(255.0)
    stats = normalization if normalization is not None else CIFAR_NORMALIZATION[dataset]
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in stats)
    return ((x - mean) / std).contiguous()


def generator_output_statistics(dataset: str, normalization: Optional[Normalization]
                                ) -> Optional[Normalization]:
    """Where the dataset's images lie in a teacher's input space: per channel
    ``mean_t = (mean_d - mean) / std`` and ``std_t = std_d / std`` for the dataset's pixel statistics
    ``(mean_d, std_d)`` (:data:`CIFAR_NORMALIZATION`) and the teacher's ``normalization``.

    A generator whose last layer standardizes its images (zero mean, unit variance per channel)
    must map them there (``x * std_t + mean_t``) before a teacher normalized otherwise: ResNet-8
    of MLPerf Tiny takes raw pixels (``mean_t`` ~ 125, ``std_t`` ~ 63). ``None`` when the teacher
    uses the dataset's own statistics (standardized images already are its input)."""
    _check_dataset(dataset)
    if normalization is None:
        return None
    data_mean, data_std = CIFAR_NORMALIZATION[dataset]
    mean, std = normalization
    if tuple(map(float, mean)) == tuple(data_mean) and tuple(map(float, std)) == tuple(data_std):
        return None
    return (tuple((dm - m) / s for dm, m, s in zip(data_mean, mean, std)),
            tuple(ds / s for ds, s in zip(data_std, std)))


@dataclass
class EvalSet:
    """Normalized test images (float32 NCHW), integer labels, where they came from, the class
    names by label (``classes[y]``) when the files carry them, and the normalization applied
    (``None``: the dataset's :data:`CIFAR_NORMALIZATION`)."""

    images: torch.Tensor
    labels: torch.Tensor
    dataset: str
    source: str  # "subset:<path>" or "torchvision:<root>"
    classes: Optional[Tuple[str, ...]] = None
    normalization: Optional[Normalization] = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def statistics(self) -> Normalization:
        """The ``(mean, std)`` the images were normalized with (to show them as pictures)."""
        return self.normalization if self.normalization is not None else CIFAR_NORMALIZATION[self.dataset]


def load_cifar_test(dataset: str, data_root: Optional[str] = None, download: bool = False,
                    normalization: Optional[Normalization] = None) -> EvalSet:
    """Real CIFAR test images for ``dataset``, normalized with the dataset's statistics or the
    teacher's ``normalization`` (see :func:`normalize_uint8_images`).

    ``data_root=None`` (default): the offline subset under :func:`shared_data_dir`.
    ``data_root=DIR``: the full test set in torchvision's layout under DIR (downloaded there
    first only when ``download=True``). Raises :class:`DataNotFoundError` with the paths tried.
    """
    _check_dataset(dataset)
    if data_root is None and not download:
        path = shared_data_dir() / dataset / "test_subset.npz"
        if not path.is_file():
            raise DataNotFoundError(
                f"no {dataset} evaluation images: {path} does not exist. Set GRANQ_DATA_DIR to the "
                f"folder holding {dataset}/test_subset.npz, or pass --data-root DIR with the torchvision "
                f"CIFAR layout (add --download to fetch it)."
            )
        with np.load(path) as arrays:
            x, y = arrays["x"], arrays["y"]
            classes = tuple(str(name) for name in arrays["classes"]) if "classes" in arrays.files else None
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8 or len(x) != len(y):
            raise ValueError(f"{path}: expected x uint8 (N, 32, 32, 3) and y (N,), got x {x.dtype} "
                             f"{x.shape}, y {y.shape}")
        return EvalSet(normalize_uint8_images(x, dataset, normalization), torch.as_tensor(y, dtype=torch.int64),
                       dataset, f"subset:{path}", classes=classes, normalization=normalization)
    root = Path(data_root if data_root is not None else shared_data_dir() / "torchvision").expanduser()
    try:
        import torchvision
    except ImportError as error:  # pragma: no cover - torchvision is a declared extra
        raise DataNotFoundError("reading the full CIFAR test set needs torchvision (from the granq_ao "
                                "clone: pip install -e \".[vision]\")") from error
    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        data = cls(str(root), train=False, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted."
        folder = cls.base_folder
        raise DataNotFoundError(
            f"no {dataset} test set in torchvision's layout under {root} (expected {root / folder}): "
            f"{error} Add --download to fetch it, or leave out --data-root to use the offline subset."
        ) from error
    x = np.asarray(data.data)
    y = np.asarray(data.targets, dtype=np.int64)
    return EvalSet(normalize_uint8_images(x, dataset, normalization), torch.from_numpy(y), dataset,
                   f"torchvision:{root}", classes=tuple(data.classes), normalization=normalization)
