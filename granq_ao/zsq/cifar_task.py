"""The CIFAR task of ``recipes/zsq_cifar.py`` (teacher, real test images, generator, run info) from
its names, for the recipe and for tools that continue or fork one of its runs
(``benchmarks/fork_run.py``) without importing the recipe script."""
from __future__ import annotations

from typing import Optional

from .cli import Task
from .data import NUM_CLASSES, load_cifar_test
from .teachers import build_cifar_teacher, cifar_teacher, teacher_generator


def cifar_task(dataset: str, arch: str, latent_dim: int, teacher_weights: Optional[str] = None,
               data_root: Optional[str] = None, download: bool = False) -> Task:
    """The pytorchcv ``arch`` teacher of ``dataset`` (weights: ``teacher_weights``, else the offline
    file, else its public download), the test images (``data_root``: the full set in torchvision's
    layout, else the offline subset) normalized with the teacher's statistics, and the teacher's
    generator (``None``: the trainer's default GDFQ generator)."""
    spec = cifar_teacher(arch, dataset)
    teacher, teacher_source = build_cifar_teacher(dataset, teacher_weights, arch=arch)
    evalset = load_cifar_test(dataset, data_root, download, spec.normalization(dataset))
    generator = teacher_generator(dataset, arch, latent_dim)
    run_info = {"dataset": dataset, "teacher": f"{arch}_{dataset} from {teacher_source}", "eval": evalset.source}
    if arch != "resnet20":  # resnet20 runs keep the run_info (and so the resumability) of earlier versions
        run_info["arch"] = arch
    return Task(teacher=teacher, num_classes=NUM_CLASSES[dataset], image_size=32, eval_data=evalset,
                normalize=None,  # load_cifar_test normalized the images with the teacher's statistics
                run_info=run_info, generator=generator)
