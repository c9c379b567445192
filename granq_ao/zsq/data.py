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
from typing import Optional, Tuple

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
]

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


def normalize_uint8_images(x_uint8_nhwc: np.ndarray, dataset: str) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW tensor ``(x / 255 - mean) / std``."""
    _check_dataset(dataset)
    x = torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc)).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in CIFAR_NORMALIZATION[dataset])
    return ((x - mean) / std).contiguous()


@dataclass
class EvalSet:
    """Normalized test images (float32 NCHW), integer labels, where they came from, and the class
    names by label (``classes[y]``) when the files carry them."""

    images: torch.Tensor
    labels: torch.Tensor
    dataset: str
    source: str  # "subset:<path>" or "torchvision:<root>"
    classes: Optional[Tuple[str, ...]] = None

    def __len__(self) -> int:
        return int(self.labels.numel())


def load_cifar_test(dataset: str, data_root: Optional[str] = None, download: bool = False) -> EvalSet:
    """Real CIFAR test images for ``dataset``.

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
        return EvalSet(normalize_uint8_images(x, dataset), torch.as_tensor(y, dtype=torch.int64),
                       dataset, f"subset:{path}", classes)
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
    return EvalSet(normalize_uint8_images(x, dataset), torch.from_numpy(y), dataset, f"torchvision:{root}",
                   tuple(data.classes))
