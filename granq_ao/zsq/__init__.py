"""Zero-shot quantization (ZSQ) machinery: GDFQ generator, AdaDFQ/GranQ losses, QAT student,
and the resumable, data-parallel training loop used by ``recipes/zsq_cifar.py``."""
from .generator import GDFQGenerator
from .losses import (batchnorm_statistics_loss, entropy_distillation_loss, entropy_margin_loss, generator_loss,
                     kl_distillation_loss, record_batchnorm_inputs, softmax_entropy, student_loss)
from .student import count_fake_quants, freeze_student_batchnorm, prepare_student
from .trainer import DistributedContext, ZSQConfig, ZSQTrainer, format_accuracy, lr_at_epoch, seed_for

__all__ = [
    "GDFQGenerator", "batchnorm_statistics_loss", "entropy_distillation_loss", "entropy_margin_loss",
    "generator_loss", "kl_distillation_loss", "record_batchnorm_inputs", "softmax_entropy", "student_loss",
    "count_fake_quants", "freeze_student_batchnorm", "prepare_student", "DistributedContext", "ZSQConfig",
    "ZSQTrainer", "format_accuracy", "lr_at_epoch", "seed_for",
]
