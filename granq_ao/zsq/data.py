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

Accuracies come with a Wilson score interval (:func:`wilson_interval`); two models evaluated
on the same images are compared with an exact McNemar test (:func:`mcnemar_exact_p`).
"""
from __future__ import annotations

import math
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
    "wilson_interval",
    "mcnemar_exact_p",
    "per_image_correct",
    "evaluate_accuracy",
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
    """Normalized test images (float32 NCHW), integer labels, and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    dataset: str
    source: str  # "subset:<path>" or "torchvision:<root>"

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
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8 or len(x) != len(y):
            raise ValueError(f"{path}: expected x uint8 (N, 32, 32, 3) and y (N,), got x {x.dtype} "
                             f"{x.shape}, y {y.shape}")
        return EvalSet(normalize_uint8_images(x, dataset), torch.as_tensor(y, dtype=torch.int64),
                       dataset, f"subset:{path}")
    root = Path(data_root if data_root is not None else shared_data_dir() / "torchvision").expanduser()
    try:
        import torchvision
    except ImportError as error:  # pragma: no cover - torchvision is a declared extra
        raise DataNotFoundError("reading the full CIFAR test set needs torchvision (pip install "
                                "granq-ao[vision])") from error
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
    return EvalSet(normalize_uint8_images(x, dataset), torch.from_numpy(y), dataset, f"torchvision:{root}")


def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ``correct / total`` (fractions).

    ``p = k/n``, ``center = (p + z^2/(2n)) / (1 + z^2/n)``,
    ``half = z * sqrt(p(1-p)/n + z^2/(4n^2)) / (1 + z^2/n)``; returns ``(center - half, center + half)``.
    """
    if total <= 0:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= correct <= total:
        raise ValueError(f"correct={correct} out of range for total={total}")
    p = correct / total
    denom = 1.0 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar test of two classifiers on the same images: ``fixed`` images only
    the second gets right, ``broken`` only the first. Under H0 each discordant image is a fair
    coin: ``p = min(1, 2 * P[Binomial(fixed + broken, 1/2) <= min(fixed, broken)])``."""
    n = fixed + broken
    if n == 0:
        return 1.0
    k = min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


@torch.no_grad()
def per_image_correct(model: torch.nn.Module, evalset: EvalSet, batch_size: int = 256,
                      device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """int64 tensor (N,): 1 where ``model`` (put in eval mode) predicts image i's label.

    The set is cut into the same fixed batches whatever the number of processes; process
    ``rank`` of ``world_size`` runs batches ``rank, rank + world_size, ...`` and leaves 0 at the
    other positions (sum the tensors across processes). Fixed batches matter: with per-tensor or
    per-channel dynamic activation ranges a prediction depends on the other images of its batch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    was_training = model.training
    model.eval()
    n = len(evalset)
    correct = torch.zeros(n, dtype=torch.int64)
    try:
        for batch_index, start in enumerate(range(0, n, batch_size)):
            if batch_index % world_size != rank:
                continue
            images = evalset.images[start:start + batch_size].to(device)
            labels = evalset.labels[start:start + batch_size].to(device)
            correct[start:start + batch_size] = (model(images).argmax(dim=1) == labels).long().cpu()
    finally:
        model.train(was_training)
    return correct


def evaluate_accuracy(model: torch.nn.Module, evalset: EvalSet, batch_size: int = 256,
                      device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> Tuple[int, int]:
    """``(correct, total)`` top-1 counts of this process's batches (see :func:`per_image_correct`)."""
    correct = per_image_correct(model, evalset, batch_size, device, rank, world_size)
    n_batches = math.ceil(len(evalset) / batch_size)
    total = sum(min(batch_size, len(evalset) - b * batch_size) for b in range(rank, n_batches, world_size))
    return int(correct.sum()), total
