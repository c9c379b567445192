"""results.json of a zero-shot run: accuracies with intervals, the McNemar comparison, provenance."""
from __future__ import annotations

import importlib.metadata
import platform
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .config import ZSQConfig
from .evaluation import mcnemar_exact_p

__all__ = ["versions", "run_results", "best_on_test"]


def versions() -> Dict[str, str]:
    """Versions of Python, torch, NumPy, granq-ao, torchvision and pytorchcv."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "granq_ao": _distribution_version("granq-ao")}
    for name in ("torchvision", "pytorchcv"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception:  # pragma: no cover - optional
            out[name] = "not installed"
    return out


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_results(state: Dict[str, Any], config: ZSQConfig, run_info: Dict[str, Any], fake_quants: Dict[str, int],
                world_size: int, device: torch.device) -> Dict[str, Any]:
    """The results dict of a run whose record holds ``state`` (epoch, history, elapsed_s and, with
    evaluation data, the teacher's, pre-QAT and last accuracy entries with per-image correctness).
    Accuracies are None without evaluation data."""
    history: List[Dict[str, Any]] = state["history"]
    results: Dict[str, Any] = {
        "teacher_acc": None, "pre_qat_acc": None, "final_acc": None, "n_test": None,
        "epochs_completed": state["epoch"],
        "eval_source": run_info["eval"],
        "teacher_source": run_info["teacher"],
        "run_info": run_info,
        "fake_quants": fake_quants,
        "config": config.to_dict(),
        "machines": state.get("machines", []),
        "sessions": state.get("sessions", []),
        "reproducibility": ("bit-identical to an uninterrupted run on the same kernels (one entry in 'machines'); "
                            "a run continued on other kernels rounds differently from then on"),
        "world_size": world_size,
        "device": str(device),
        "versions": versions(),
        "wall_time_s": state["elapsed_s"],
        "mean_s_per_iter": float(np.mean([row["s_per_iter"] for row in history])) if history else None,
    }
    if state.get("teacher") is None:
        return results
    results.update(_accuracies(state["teacher"], state["pre_qat"], state["last"]))
    best = best_on_test(history)
    if best is not None:
        results["best_on_test"] = best
    return results


def _accuracies(teacher: Dict[str, Any], pre_qat: Dict[str, Any], final: Dict[str, Any]) -> Dict[str, Any]:
    pre, fin = pre_qat["per_image"].long(), final["per_image"].long()
    fixed, broken = int(((pre == 0) & (fin == 1)).sum()), int(((pre == 1) & (fin == 0)).sum())
    return {
        "teacher_acc": teacher["acc"],
        "pre_qat_acc": pre_qat["acc"],
        "final_acc": final["acc"],
        "n_test": final["n"],
        "intervals": {"method": "Wilson score interval, 95%", "teacher": teacher["ci95"],
                      "pre_qat": pre_qat["ci95"], "final": final["ci95"]},
        "correct": {"teacher": teacher["correct"], "pre_qat": pre_qat["correct"], "final": final["correct"]},
        "final_vs_pre_qat": {"fixed": fixed, "broken": broken, "mcnemar_exact_p": mcnemar_exact_p(fixed, broken),
                             "note": "same test images: fixed = wrong before QAT and right after, broken = "
                                     "the reverse; exact two-sided McNemar test"},
    }


def best_on_test(history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The evaluated epoch of highest test accuracy (the earliest of ties), labelled for what it is:
    picked on the test images (the official code's "best"), not a held-out estimate."""
    evaluated = [row for row in history if "test_acc" in row]
    if not evaluated:
        return None
    best = max(evaluated, key=lambda row: (row["test_acc"], -row["epoch"]))
    return {"acc": best["test_acc"], "epoch": best["epoch"],
            "note": "max over epochs of the TEST accuracy: test-set selection, optimistic; the reported "
                    "number is final_acc"}
