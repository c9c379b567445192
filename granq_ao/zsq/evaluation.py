"""Evaluating a classifier on real images: fixed batches, top-1 per image, 95% intervals.

Evaluation data may be

* an :class:`~granq_ao.zsq.data.EvalSet` (normalized images and labels in memory, e.g. the CIFAR
  test subsets), cut into fixed batches of ``batch_size``;
* any map-style ``torch.utils.data.Dataset`` of ``(image, label)`` pairs (e.g. a torchvision
  ``ImageFolder`` with its transform), read in order with a ``DataLoader`` of ``batch_size``;
* a ``DataLoader`` (its own batches, in its order: do not shuffle it).

``normalize=(mean, std)`` maps each batch to ``(x - mean) / std`` per channel before the model
(for images in [0, 1], e.g. from ``ToTensor()``); ``None`` feeds the images as they are.
Batches are fixed whatever the number of processes: with per-tensor or per-channel dynamic
activation ranges a prediction depends on the other images of its batch.

Accuracies come with a Wilson score interval (:func:`wilson_interval`); two models evaluated on
the same images are compared with an exact McNemar test (:func:`mcnemar_exact_p`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from .data import EvalSet

__all__ = ["wilson_interval", "mcnemar_exact_p", "eval_batches", "per_image_correct", "evaluate_accuracy",
           "accuracy_entry", "format_accuracy", "describe_eval_data", "check_eval_data"]

Normalization = Optional[Tuple[Sequence[float], Sequence[float]]]
SetTraining = Callable[[torch.nn.Module, bool], Any]


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


def check_eval_data(eval_data: Any) -> None:
    """``TypeError`` unless ``eval_data`` is one of the accepted kinds (module docstring)."""
    if not isinstance(eval_data, (EvalSet, torch.utils.data.DataLoader, torch.utils.data.Dataset)):
        raise TypeError(f"evaluation data must be an EvalSet, a Dataset of (image, label) or a DataLoader; "
                        f"got {type(eval_data).__name__}")


def eval_batches(eval_data: Any, batch_size: int = 256, normalize: Normalization = None
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of ``eval_data`` in a fixed order (see the module docstring)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if isinstance(eval_data, EvalSet):
        batches = ((eval_data.images[start:start + batch_size], eval_data.labels[start:start + batch_size])
                   for start in range(0, len(eval_data), batch_size))
    elif isinstance(eval_data, torch.utils.data.DataLoader):
        batches = iter(eval_data)
    elif isinstance(eval_data, torch.utils.data.Dataset):
        batches = iter(torch.utils.data.DataLoader(eval_data, batch_size=batch_size, shuffle=False))
    else:
        check_eval_data(eval_data)
    mean = std = None
    if normalize is not None:
        mean, std = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalize)
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError("each evaluation batch must be (images, labels)")
        images, labels = batch[0], torch.as_tensor(batch[1])
        if mean is not None:
            images = (images.float() - mean) / std
        yield images, labels


def describe_eval_data(eval_data: Any) -> str:
    """A short description of where evaluation images come from (for logs and results.json)."""
    if isinstance(eval_data, EvalSet):
        return eval_data.source
    if isinstance(eval_data, torch.utils.data.DataLoader):
        eval_data = eval_data.dataset
    root = getattr(eval_data, "root", None)
    return f"{type(eval_data).__name__}" + (f":{root}" if root is not None else "")


@torch.no_grad()
def per_image_correct(model: torch.nn.Module, eval_data: Any, batch_size: int = 256,
                      device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                      normalize: Normalization = None, set_training: Optional[SetTraining] = None) -> torch.Tensor:
    """int64 tensor (N,): 1 where ``model`` (put in eval mode) predicts image i's label.

    Process ``rank`` of ``world_size`` runs batches ``rank, rank + world_size, ...`` and leaves 0
    at the other positions (sum the tensors across processes). ``set_training(model, mode)``
    switches train/eval (default ``model.train(mode)``; a student's protocol's ``set_training``)."""
    return _correct_and_mine(model, eval_data, batch_size, device, rank, world_size, normalize, set_training)[0]


def _batches_of_rank(eval_data, batch_size, normalize, rank, world_size):
    """``(ours, size, (images, labels) or None)`` for every batch of ``eval_data``'s fixed order;
    batch ``b`` is process ``b % world_size``'s. A map-style ``Dataset`` (an ImageFolder) is read
    only where it is this process's: the other processes' images are never decoded here."""
    is_dataset = isinstance(eval_data, torch.utils.data.Dataset) and not isinstance(eval_data, EvalSet)
    if world_size == 1 or not is_dataset or not hasattr(eval_data, "__len__"):
        for index, (images, labels) in enumerate(eval_batches(eval_data, batch_size, normalize)):
            ours = index % world_size == rank
            yield ours, len(labels), (images, labels) if ours else None
        return
    total = len(eval_data)
    starts = range(0, total, batch_size)
    owned = [start for index, start in enumerate(starts) if index % world_size == rank]
    indices = [i for start in owned for i in range(start, min(start + batch_size, total))]
    loaded = eval_batches(torch.utils.data.Subset(eval_data, indices), batch_size, normalize)
    for index, start in enumerate(starts):
        ours = index % world_size == rank
        yield ours, min(batch_size, total - start), next(loaded) if ours else None


def _train_mode(model: torch.nn.Module, mode: bool) -> torch.nn.Module:
    return model.train(mode)


def _correct_and_mine(model, eval_data, batch_size, device, rank, world_size, normalize, set_training=None):
    """``(correct, mine)``: per-image int64 correctness (0 off this process's batches) and a bool
    mask of the images this process evaluated."""
    set_training = set_training or _train_mode
    was_training = model.training
    set_training(model, False)
    correct, mine = [], []
    try:
        for ours, size, batch in _batches_of_rank(eval_data, batch_size, normalize, rank, world_size):
            mine.append(torch.full((size,), ours))
            if not ours:
                correct.append(torch.zeros(size, dtype=torch.int64))
                continue
            images, labels = batch
            logits = model(images.to(device))
            correct.append((logits.argmax(dim=1).cpu() == labels.cpu()).long())
    finally:
        set_training(model, was_training)
    if not correct:
        raise ValueError("the evaluation data holds no images")
    return torch.cat(correct), torch.cat(mine)


def evaluate_accuracy(model: torch.nn.Module, eval_data: Any, batch_size: int = 256,
                      device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                      normalize: Normalization = None) -> Tuple[int, int]:
    """``(correct, total)`` top-1 counts of this process's batches (see :func:`per_image_correct`)."""
    correct, mine = _correct_and_mine(model, eval_data, batch_size, device, rank, world_size, normalize)
    return int(correct.sum()), int(mine.sum())


def accuracy_entry(correct: int, total: int) -> Dict[str, Any]:
    """``{"acc", "correct", "n", "ci95"}`` with the Wilson 95% interval."""
    low, high = wilson_interval(correct, total)
    return {"acc": correct / total, "correct": correct, "n": total, "ci95": [low, high]}


def format_accuracy(entry: Dict[str, Any]) -> str:
    """``93.02% [91.3, 94.4] (n=1017)`` (Wilson 95% interval in points)."""
    low, high = entry["ci95"]
    return f"{100 * entry['acc']:.2f}% [{100 * low:.1f}, {100 * high:.1f}] (n={entry['n']})"
