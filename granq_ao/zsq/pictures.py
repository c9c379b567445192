"""Pictures of a zero-shot run: PNG files next to results.json, and TensorBoard images.

A run (:class:`~granq_ao.zsq.trainer.ZSQTrainer`, through its run record) draws them on process 0
when it has an output folder; a failure to draw warns and never stops the run.

* ``accuracy.png`` (after every epoch): top-1 of the student on the evaluation images per epoch
  with its 95% Wilson interval as a band, and horizontal lines for the teacher and for the
  student before QAT (with their bands); warm-up epochs shaded. From the metrics history. Its
  title is short: bits, granularity and the teacher's name (:func:`short_title`).
* ``generated_epochNNN.png`` (after epoch 1, epoch ``epochs // 2`` and the final epoch): the
  generator's images, one row per class in class order (all classes up to 10, else 10 evenly
  spaced, first and last included: 0, 111, 222, ..., 999 for ImageNet), each row labelled with
  its class name when the evaluation data carries the names (CIFAR), else its index; eight
  fixed latent codes per class (drawn once from a seeded stream, the same at every epoch, so
  the rows can be compared across epochs). Images are de-normalized with the run's
  ``(mean, std)`` when known (the trainer's ``normalize``, or the CIFAR statistics of a CIFAR
  ``EvalSet``), else each image is scaled to its own min..max. The generator runs in train mode
  (batch statistics, as in training) under ``no_grad``; its BatchNorm buffers are restored after.
* ``activation_error.png`` and ``activation_error.json`` (before QAT at the start, after QAT at
  the final epoch): the paper's Figure 3 / Table 2 view. What is measured, exactly:

  - ``X``: the input of each activation quantizer of the student (its toolchain's
    :class:`~granq_ao.student_protocol.StudentProtocol` lists them; with the paper placement, each
    ReLU/ReLU6 output), captured with forward pre-hooks while the student runs on the first
    :data:`ACTIVATION_IMAGES` evaluation images (normalized as for evaluation) with **every**
    fake-quant (weights and activations) and observer disabled: the float activations of the
    network the student's weights define. Before QAT these are the float teacher's activations
    (the student with fake-quant off computes the teacher's function); after QAT, those of the
    trained weights. A fake-quant called several times (shared by several ops) gives one point
    per call.
  - For each ``X`` and the run's activation bits ``b``: ``e = ||X - Q(X)||_F / ||X||_F`` over the
    whole captured tensor, with ``Q = granq_ao.functional.fake_quantize(X, b, granularity)``
    (asymmetric, dynamic ranges from ``X`` itself) for ``granularity="tensor"`` (layer-wise: one
    range for the batch) and ``"granq"`` (one range per (sample, channel)). Each layer's error is
    thus that of quantizing this one activation of an otherwise float network; errors do not
    compound across layers. ``nan`` where ``||X|| = 0``. One tensor that several quantizers
    receive (modelopt quantizes the input of each layer it feeds) is one point.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from granq_ao.functional import fake_quantize
from granq_ao.student_protocol import StudentProtocol

from .checkpoint import atomic_write_json, rng_state, set_rng_state
from .evaluation import eval_batches
from .student import student_protocol

__all__ = ["ACTIVATION_IMAGES", "picture_epochs", "activation_errors", "activation_points", "short_title",
           "accuracy_figure", "activation_error_figure", "generated_images", "class_names", "row_labels",
           "save_generated_grid", "RunPictures"]

ACTIVATION_IMAGES = 32
GRID_CLASSES = 10
GRID_SAMPLES = 8
GRID_MAX_SIDE = 112  # larger generated images are shown downscaled (224 -> 112)
GRID_MIN_SIDE = 64   # smaller ones are enlarged by an integer factor, nearest neighbour (32 -> 64)
GRID_PADDING = 2     # white pixels around each image
LABEL_FONT_SIZE = 9  # row labels, points
LATENT_SEED = 20250318


def picture_epochs(epochs: int) -> Tuple[int, ...]:
    """Epochs (1-based) after which the generated images are drawn: 1, ``epochs // 2``, last."""
    return tuple(sorted({1, max(1, epochs // 2), epochs}))


# ----------------------------------------------------------------------------- activations
def activation_points(model: nn.Module, quantizers: Optional[Dict[str, nn.Module]] = None) -> Dict[str, str]:
    """``{quantizer module name: label}`` for ``quantizers`` (default: the activation quantizers of
    an fx student): the label is the module (or op) whose output it quantizes, read from the
    graph when ``model`` is a GraphModule (fx, pt2e), else the quantizer's own name."""
    names = quantizers if quantizers is not None else student_protocol("fx").activation_quantizers(model)
    labels = {name: name for name in names}
    graph = getattr(model, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and node.target in names and node.args:
                producer = node.args[0]
                if hasattr(producer, "op"):
                    labels[node.target] = str(producer.target) if producer.op == "call_module" else producer.name
    return labels


@torch.no_grad()
def activation_errors(model: nn.Module, images: torch.Tensor, bits: int,
                      granularities: Sequence[str] = ("tensor", "granq"),
                      protocol: Optional[StudentProtocol] = None) -> Dict[str, Any]:
    """Relative error of quantizing each activation of ``model`` (a student built by ``protocol``'s
    toolchain, default fx) on ``images`` (module docstring): ``{"layers": [label, ...], "modules":
    [name, ...], "bits": b, "n_images": N, g: [e per layer] for g in granularities}``. One tensor
    reaching several quantizers (modelopt quantizes each layer's input) is one point, named after
    the first. The model's quantizer switches and its train/eval mode are restored afterwards."""
    protocol = protocol if protocol is not None else student_protocol("fx")
    quantizers = protocol.activation_quantizers(model)
    labels = activation_points(model, quantizers)
    out: Dict[str, Any] = {"layers": [], "modules": [], "bits": int(bits), "n_images": int(images.shape[0]),
                           **{g: [] for g in granularities}}
    seen: List[torch.Tensor] = []

    def hook(name):
        def record(module, inputs):
            if any(inputs[0] is tensor for tensor in seen):
                return
            seen.append(inputs[0])
            x = inputs[0].detach().float()
            calls = out["modules"].count(name)
            out["modules"].append(name)
            out["layers"].append(labels[name] + (f" (call {calls + 1})" if calls else ""))
            norm = float(torch.linalg.vector_norm(x))
            for granularity in granularities:
                if norm == 0 or x.dim() < 2:
                    out[granularity].append(float("nan"))
                    continue
                q = fake_quantize(x, bits, granularity, fused="eager")
                out[granularity].append(float(torch.linalg.vector_norm(x - q)) / norm)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in quantizers.items()]
    was_training = model.training
    try:
        with protocol.quantizers_off(model):
            protocol.set_training(model, False)
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
        protocol.set_training(model, was_training)
    return out


def first_images(eval_data: Any, count: int, normalize=None) -> Optional[torch.Tensor]:
    """The first ``count`` evaluation images (normalized as for evaluation), or None."""
    if eval_data is None:
        return None
    taken: List[torch.Tensor] = []
    have = 0
    for images, _ in eval_batches(eval_data, count, normalize):
        taken.append(images[:count - have])
        have += len(taken[-1])
        if have >= count:
            break
    return torch.cat(taken) if taken else None


# ----------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def short_title(weight_bits: int, act_bits: int, act_granularity: str, teacher: str = "") -> str:
    """``"W4A4 granq | resnet20_cifar10"``: the teacher's description without where its weights
    came from (``"<name> from <path or URL>"``: often a long absolute path), a bare path reduced to
    its file name."""
    name = str(teacher).split(" from ", 1)[0].strip()
    if "/" in name or "\\" in name:
        name = name.replace("\\", "/").rstrip("/").rpartition("/")[2]
    return f"W{weight_bits}A{act_bits} {act_granularity}" + (f" | {name}" if name else "")


def accuracy_figure(history: Sequence[Dict[str, Any]], teacher: Optional[Dict[str, Any]],
                    pre_qat: Optional[Dict[str, Any]], title: str = ""):
    """A matplotlib Figure of test accuracy per epoch (module docstring), or None without any
    accuracy in ``history``."""
    rows = [row for row in history if row.get("test_acc") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    epochs = [row["epoch"] for row in rows]
    acc = [100 * row["test_acc"] for row in rows]
    low = [100 * row["test_ci95_low"] for row in rows]
    high = [100 * row["test_ci95_high"] for row in rows]
    warm = [row["epoch"] for row in history if row.get("phase") == "warmup"]
    if warm:
        ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.92", label="warm-up (generator only)")
    for entry, name, color in ((teacher, "teacher (FP)", "tab:green"), (pre_qat, "before QAT", "tab:red")):
        if entry is not None:
            ax.axhline(100 * entry["acc"], color=color, linestyle="--", linewidth=1.2,
                       label=f"{name} {100 * entry['acc']:.2f}%")
            ax.axhspan(100 * entry["ci95"][0], 100 * entry["ci95"][1], color=color, alpha=0.08)
    ax.fill_between(epochs, low, high, color="tab:blue", alpha=0.25, label="95% interval")
    ax.plot(epochs, acc, color="tab:blue", marker="o" if len(epochs) <= 40 else None, markersize=3,
            label=f"student (final {acc[-1]:.2f}%)")
    ax.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"top-1 accuracy, % (n={rows[-1].get('n_test')})")
    ax.set_xlim(0.5, max(epochs) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def activation_error_figure(before: Optional[Dict[str, Any]], after: Optional[Dict[str, Any]], title: str = ""):
    """Grouped bars of the per-layer relative error, layer-wise vs GranQ, before/after QAT."""
    reference = before or after
    if reference is None:
        return None
    plt = _pyplot()
    layers = reference["layers"]
    count = len(layers)
    series = []
    for data, when in ((before, "before QAT"), (after, "after QAT")):
        if data is None or len(data["layers"]) != count:
            continue
        series.append((data["tensor"], f"layer-wise, {when}", "tab:orange" if when == "before QAT" else "tab:red"))
        series.append((data["granq"], f"GranQ, {when}", "tab:cyan" if when == "before QAT" else "tab:blue"))
    fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 0.3 * count + 2)), 4.5), dpi=100)
    width = 0.8 / max(1, len(series))
    for k, (values, label, color) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(count)]
        ax.bar(xs, values, width=width, label=label, color=color)
    ax.set_ylim(bottom=0)  # linear: a lossless layer (e.g. GranQ on 1x1 maps: min == max) shows as 0
    ax.set_xticks(range(count))
    ax.set_xticklabels([f"{i + 1}" for i in range(count)], fontsize=7)
    ax.set_xlabel("quantized activation (network order; names in activation_error.json)")
    ax.set_ylabel("||X - Q(X)|| / ||X||")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"A{reference['bits']} relative activation error on {reference['n_images']} "
                          "evaluation images", fontsize=10)
    fig.tight_layout()
    return fig


def _save_figure(fig, path: Path) -> None:
    plt = _pyplot()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- generated images
def grid_classes(num_classes: int, count: int = GRID_CLASSES) -> List[int]:
    """All classes up to ``count``, else ``count`` evenly spaced ones (first and last included)."""
    if num_classes <= count:
        return list(range(num_classes))
    return sorted({round(i * (num_classes - 1) / (count - 1)) for i in range(count)})


@torch.no_grad()
def generated_images(generator: nn.Module, classes: Sequence[int], samples: int = GRID_SAMPLES,
                     seed: int = LATENT_SEED) -> torch.Tensor:
    """``G(z, y)`` for ``samples`` fixed latents per class (rows = classes), in the generator's
    (normalized) output space; buffers and train/eval mode of ``generator`` are unchanged after."""
    latent_dim = int(generator.latent_dim)
    device = next(generator.parameters()).device
    stream = torch.Generator().manual_seed(seed)
    z = torch.randn(len(classes) * samples, latent_dim, generator=stream).to(device)
    labels = torch.tensor([c for c in classes for _ in range(samples)], dtype=torch.long, device=device)
    buffers = [b.detach().clone() for b in generator.buffers()]
    was_training = generator.training
    try:
        generator.train()  # batch statistics, as in training
        images = generator(z, labels).float().cpu()
    finally:
        for buffer, value in zip(generator.buffers(), buffers):
            buffer.copy_(value)
        generator.train(was_training)
    return images


def to_display(images: torch.Tensor, normalize=None) -> torch.Tensor:
    """Images in [0, 1]: ``x * std + mean`` clamped when ``normalize=(mean, std)`` is known,
    else each image scaled to its own min..max; downscaled to at most GRID_MAX_SIDE px, or
    enlarged (integer factor, nearest neighbour) to at least GRID_MIN_SIDE px."""
    images = images.float()
    if normalize is not None:
        mean, std = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalize)
        images = (images * std + mean).clamp(0, 1)
    else:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - low) / (high - low).clamp_min(1e-12)
    side = max(images.shape[-2:])
    if side > GRID_MAX_SIDE:
        scale = GRID_MAX_SIDE / side
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="bilinear", antialias=True,
                                                 align_corners=False).clamp(0, 1)
    elif side < GRID_MIN_SIDE:
        images = torch.nn.functional.interpolate(images, scale_factor=-(-GRID_MIN_SIDE // side), mode="nearest")
    return images


def class_names(eval_data: Any, num_classes: int) -> Optional[Sequence[str]]:
    """The names of the ``num_classes`` classes, by index, when ``eval_data`` carries them as
    ``classes`` (an ``EvalSet`` of CIFAR, a torchvision dataset), else None."""
    names = getattr(eval_data, "classes", None)
    if names is None or isinstance(names, str) or len(names) != num_classes:
        return None
    return [str(name) for name in names]


def row_labels(classes: Sequence[int], names: Optional[Sequence[str]] = None) -> List[str]:
    """The label of each grid row: the class name when ``names`` (indexed by class) is given,
    else the class index."""
    return [str(names[c]) if names is not None else str(c) for c in classes]


def save_generated_grid(images: torch.Tensor, samples: int, path: Path,
                        labels: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``make_grid`` (one row per class, ``samples`` images a row) saved as PNG at ``path``, pixel
    for pixel, with ``labels`` (one per row; default: the row index) written left of the rows;
    returns the grid without labels (3, H, W)."""
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=samples, padding=GRID_PADDING, pad_value=1.0)
    rows = -(-images.shape[0] // samples)
    labels = [str(row) for row in range(rows)] if labels is None else [str(label) for label in labels]
    if len(labels) != rows:
        raise ValueError(f"{len(labels)} row labels for a grid of {rows} rows")
    plt = _pyplot()
    height, width = grid.shape[1:]
    margin = 16 + 7 * max(len(label) for label in labels)  # pixels for the labels (about 7 px a character)
    dpi = 100
    fig = plt.figure(figsize=((width + margin) / dpi, height / dpi), dpi=dpi, facecolor="white")
    ax = fig.add_axes((margin / (width + margin), 0, width / (width + margin), 1))
    ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    side = images.shape[-2]
    ax.set_yticks([GRID_PADDING + row * (side + GRID_PADDING) + (side - 1) / 2 for row in range(rows)])
    ax.set_yticklabels(labels, fontsize=LABEL_FONT_SIZE)
    ax.set_xticks([])
    ax.tick_params(length=0, pad=3)
    for spine in ax.spines.values():
        spine.set_visible(False)
    _save_figure(fig, path)
    return grid


# ----------------------------------------------------------------------------- the run's pictures
class RunPictures:
    """Draws the pictures of one run into ``out_dir`` (and TensorBoard's ``writer``, when given);
    the run record (:class:`~granq_ao.zsq.run_record.RunRecord`) calls it on process 0. Every
    method catches its own errors and warns. The global random state is saved and restored around
    each drawing, so pictures never change the training.

    Args:
        out_dir: the run's folder.
        config: the run's :class:`~granq_ao.zsq.config.ZSQConfig` (bits, granularity, epochs).
        run_info: the run's descriptive facts (``teacher``).
        num_classes: the classes the generator is conditioned on.
        eval_data, normalize: the evaluation images and their normalization (the activation
            errors are measured on the first :data:`ACTIVATION_IMAGES`).
        writer: a TensorBoard ``SummaryWriter`` or None.
    """

    def __init__(self, out_dir: Path, config: Any, run_info: Optional[Dict[str, Any]] = None, *,
                 num_classes: Optional[int] = None, eval_data: Any = None, normalize=None, writer=None) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.run_info = run_info or {}
        self.num_classes = num_classes
        self.eval_data = eval_data
        self.normalize = normalize
        self.writer = writer

    # -- helpers
    def _guard(self, what: str, function, *args):
        """``function(*args)``, or None after a warning when it fails."""
        state = rng_state()
        try:
            return function(*args)
        except Exception as error:  # plotting must never kill a run
            warnings.warn(f"could not draw {what}: {type(error).__name__}: {error}", RuntimeWarning, stacklevel=2)
            return None
        finally:
            set_rng_state(state)

    def _display_normalization(self):
        if self.normalize is not None:
            return self.normalize
        from .data import EvalSet

        if isinstance(self.eval_data, EvalSet):
            return self.eval_data.statistics  # the teacher's normalization (raw pixels for ResNet-8)
        return None

    def _tensorboard_figure(self, tag: str, fig, step: int) -> None:
        if self.writer is not None and fig is not None:
            self.writer.add_figure(tag, fig, step, close=False)
            self.writer.flush()

    def _title(self) -> str:
        cfg = self.config
        return short_title(cfg.weight_bits, cfg.act_bits, cfg.act_granularity, self.run_info.get("teacher", ""))

    # -- stages
    def start(self, student: nn.Module, protocol: StudentProtocol, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Before QAT: the activation errors of the untrained ``student`` and their figure;
        returns them (for the run's state, so a resumed run still has them), or None."""
        return self._guard("the activation errors before QAT", self._activations, "pre_qat", student, protocol, state)

    def epoch_end(self, state: Dict[str, Any], generator: nn.Module, student: nn.Module,
                  protocol: StudentProtocol) -> Optional[Dict[str, Any]]:
        """After epoch ``state["epoch"]`` (1-based; ``state`` is the run's: history, accuracy
        entries, activation errors before QAT): accuracy; generated images at the picture epochs;
        activation errors after QAT at the final epoch, returned (else None)."""
        epoch = state["epoch"]
        self._guard("the accuracy plot", self._accuracy, state)
        if epoch in picture_epochs(self.config.epochs):
            self._guard("the generated images", self._generated, generator, epoch)
        if epoch == self.config.epochs:
            return self._guard("the activation errors after QAT", self._activations, "final", student, protocol, state)
        return None

    def _accuracy(self, state: Dict[str, Any]) -> None:
        fig = accuracy_figure(state["history"], state.get("teacher"), state.get("pre_qat"), self._title())
        if fig is None:
            return
        self._tensorboard_figure("pictures/accuracy", fig, state["epoch"])
        _save_figure(fig, self.out_dir / "accuracy.png")

    def _generated(self, generator: nn.Module, epoch: int) -> None:
        classes = grid_classes(self.num_classes)
        images = to_display(generated_images(generator, classes), self._display_normalization())
        labels = row_labels(classes, class_names(self.eval_data, self.num_classes))
        grid = save_generated_grid(images, GRID_SAMPLES, self.out_dir / f"generated_epoch{epoch:03d}.png", labels)
        if self.writer is not None:
            self.writer.add_image("pictures/generated", grid, epoch)
            self.writer.flush()

    def _activations(self, stage: str, student: nn.Module, protocol: StudentProtocol,
                     state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        images = first_images(self.eval_data, ACTIVATION_IMAGES, self.normalize)
        if images is None:
            return None
        errors = activation_errors(student, images, self.config.act_bits, protocol=protocol)
        errors["epoch"] = state["epoch"]
        before = errors if stage == "pre_qat" else state.get("activation_error_pre_qat")
        after = errors if stage == "final" else None
        atomic_write_json({"measure": "||X - Q(X)||_F / ||X||_F per quantized activation X (student with every "
                                      "fake-quant off), Q = granq_ao.functional.fake_quantize with the run's "
                                      "activation bits; see granq_ao/zsq/pictures.py",
                           "before_qat": before, "after_qat": after},
                          self.out_dir / "activation_error.json")
        fig = activation_error_figure(before, after)
        self._tensorboard_figure("pictures/activation_error", fig, state["epoch"])
        if fig is not None:
            _save_figure(fig, self.out_dir / "activation_error.png")
        return errors
