"""Zero-shot quantization (ZSQ) for any teacher: :func:`zero_shot_qat`, the resumable,
data-parallel trainer (two pieces: the algorithm, AdaDFQ's generator/student game with a GranQ
student, and the run record: checkpoints, files, pictures), the GDFQ generator, the losses, and
evaluation on real images. CIFAR specifics (the offline test subsets,
pytorchcv ResNet-20 teachers) are in :mod:`granq_ao.zsq.data` and :mod:`granq_ao.zsq.teachers`,
used by ``recipes/zsq_cifar.py``; ImageNet ones (pytorchcv/torchvision teachers, ImageFolder
validation images) in :mod:`granq_ao.zsq.imagenet`, used by ``recipes/zsq_imagenet.py``. The
pictures every run draws are :mod:`granq_ao.zsq.pictures`."""
from .algorithm import ZSQAlgorithm, lr_at_epoch, seed_for
from .api import zero_shot_qat
from .config import ZSQConfig
from .distributed import DistributedContext
from .evaluation import format_accuracy, mcnemar_exact_p, per_image_correct, wilson_interval
from .generator import GDFQGenerator, ImageNetGenerator
from .losses import (batchnorm_statistics_loss, entropy_distillation_loss, entropy_margin_loss, gdfq_generator_loss,
                     generator_loss, kl_distillation_loss, record_batchnorm_inputs, softmax_entropy, student_loss)
from .student import TOOLCHAINS, build_student, count_fake_quants, freeze_student_batchnorm, prepare_student
from .options import RunOptions
from .run_record import RunRecord
from .trainer import ZSQTrainer

__all__ = [
    "zero_shot_qat", "ZSQConfig", "RunOptions", "ZSQTrainer", "ZSQAlgorithm", "RunRecord", "DistributedContext",
    "GDFQGenerator", "ImageNetGenerator",
    "TOOLCHAINS", "build_student",
    "prepare_student", "count_fake_quants", "freeze_student_batchnorm", "batchnorm_statistics_loss",
    "entropy_distillation_loss", "entropy_margin_loss", "generator_loss", "gdfq_generator_loss", "kl_distillation_loss",
    "record_batchnorm_inputs", "softmax_entropy", "student_loss", "format_accuracy", "wilson_interval",
    "mcnemar_exact_p", "per_image_correct", "lr_at_epoch", "seed_for",
]
