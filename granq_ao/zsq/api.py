"""``zero_shot_qat``: zero-shot GranQ quantization of any classifier in one call.

    student, results = zero_shot_qat(teacher, ZSQConfig(weight_bits=4, act_bits=4, epochs=10,
                                     iters_per_epoch=100), num_classes=10, image_size=32,
                                     normalize=((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
                                     eval_data=my_test_dataset, out_dir="runs/mine")

No training image is used: a generator learns from the frozen teacher and the GranQ student
learns from the teacher on the generated images (:mod:`granq_ao.zsq.trainer`). ``eval_data``
(optional) only measures accuracy.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

from torch import nn

from .distributed import DistributedContext
from .trainer import ZSQConfig, ZSQTrainer

__all__ = ["zero_shot_qat"]


def zero_shot_qat(teacher: nn.Module, config: Optional[ZSQConfig] = None, *, num_classes: int,
                  image_size: int = 32, channels: int = 3, normalize=None, eval_data: Any = None,
                  out_dir: Optional[os.PathLike] = None, resume: bool = False,
                  context: Optional[DistributedContext] = None, **trainer_options: Any
                  ) -> Tuple[nn.Module, Dict[str, Any]]:
    """Zero-shot QAT of ``teacher``: returns ``(student, results)``.

    Args:
        teacher: a classifier taking normalized ``(N, channels, image_size, image_size)`` images
            (it is frozen: eval mode, no gradients).
        config: the run's options (default :class:`ZSQConfig`: the paper's CIFAR schedule, W4A4).
        num_classes, image_size, channels: what the teacher classifies and takes.
        normalize: ``(mean, std)`` for ``eval_data`` images in [0, 1]; ``None`` if they are
            normalized already.
        eval_data: an ``EvalSet``, a ``Dataset`` of ``(image, label)`` or a ``DataLoader``, or
            ``None`` (then no accuracy is measured).
        out_dir: checkpoints, metrics.jsonl, TensorBoard logs, results.json (``None``: nothing is
            written and the run cannot be resumed).
        resume: continue the run saved in ``out_dir``.
        context: a :class:`~granq_ao.zsq.distributed.DistributedContext` (default: one process,
            CPU; ``DistributedContext.from_env()`` under torchrun).
        trainer_options: ``generator``, ``run_info``, ``options`` (a
            :class:`~granq_ao.zsq.options.RunOptions`) or its fields (``tensorboard``,
            ``progress``, ``log``, ``fused``, ...) (see :class:`~granq_ao.zsq.trainer.ZSQTrainer`).

    ``student`` is the trained fake-quantized model (eval mode, set through its toolchain's student
    protocol: an exported PT2E graph keeps refusing ``.train()``/``.eval()``, torchao's rule);
    ``results`` has the fields of results.json (accuracies with n and 95% intervals are None without ``eval_data``).
    """
    trainer = ZSQTrainer(config or ZSQConfig(), teacher, out_dir, num_classes=num_classes, image_size=image_size,
                         channels=channels, eval_data=eval_data, normalize=normalize, context=context,
                         resume=resume, **trainer_options)
    results = trainer.run()
    trainer.protocol.set_training(trainer.student, False)
    return trainer.student, results
