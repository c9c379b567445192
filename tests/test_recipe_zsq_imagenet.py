"""recipes/zsq_imagenet.py end to end on CPU: a tiny ImageFolder written here (3 classes x 4
images), pytorchcv's ResNet-18 with random weights for 3 classes, 32 px images, a few iterations.
Files and pictures, resume equivalence, the activation-error numbers, and one-line CLI errors."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("pytorchcv")
pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (torchvision's dependency)

from granq_ao.zsq import ImageNetGenerator, ZSQConfig, ZSQTrainer, build_student  # noqa: E402
from granq_ao.zsq import pictures  # noqa: E402
from granq_ao.zsq.imagenet import IMAGENET_NORMALIZATION, build_imagenet_teacher, load_imagenet_val  # noqa: E402

from conftest import import_script  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WNIDS = ("n01440764", "n01443537", "n01484850")
PER_CLASS = 4
SIZE = 32
TINY = ["--image-size", str(SIZE), "--epochs", "2", "--iters", "2", "--batch-size", "4", "--warmup-epochs", "1",
        "--eval-batch-size", "8", "--workers", "0"]


def load_recipe():
    return import_script("recipes/zsq_imagenet.py", "zsq_imagenet_recipe")


def write_image_folder(root: Path, wnids, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for index, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            suffix = ".png" if i == 0 else ".JPEG"  # both kinds of file the val set may hold
            Image.fromarray(pixels).save(root / wnid / f"ILSVRC2012_val_{index * per_class + i:08d}{suffix}")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """val/ (3 classes), val2/ (2 classes), a 3-class pytorchcv ResNet-18 state dict."""
    root = tmp_path_factory.mktemp("imagenet")
    write_image_folder(root / "val", WNIDS, PER_CLASS)
    write_image_folder(root / "val2", WNIDS[:2], 2, seed=1)
    from pytorchcv.models.resnet import resnet18

    torch.manual_seed(0)
    torch.save(resnet18(num_classes=len(WNIDS)).state_dict(), root / "resnet18_3.pth")
    return root


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("GRANQ_FUSED", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add overhead (and contention on shared CI)
    yield
    torch.set_num_threads(threads)


def common(files):
    return TINY + ["--arch", "resnet18", "--teacher-weights", str(files / "resnet18_3.pth"),
                   "--val-dir", str(files / "val")]


def check_png(path: Path, min_size=(40, 40)):
    assert path.is_file(), path
    with Image.open(path) as image:
        image.verify()  # a complete, valid PNG
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        return image.size


def test_tiny_run_writes_results_and_pictures(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert load_recipe().main(common(files) + ["--out", str(out), "--amp", "--channels-last"]) == 0
    printed = capsys.readouterr().out
    n = len(WNIDS) * PER_CLASS
    for label in ("teacher      :", "W4A4 pre-QAT :", "W4A4 final   :"):
        assert label in printed
    assert f"(n={n})" in printed and "ETA" in printed
    assert "amp, channels_last ignored on cpu (CUDA only)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["n_test"] == n and results["epochs_completed"] == 2
    assert results["fake_quants"] == {"weight": 21, "activation": 17}  # ResNet-18: 20 convs + fc; 17 ReLUs
    for name, key in (("teacher", "teacher_acc"), ("pre_qat", "pre_qat_acc"), ("final", "final_acc")):
        low, high = results["intervals"][name]
        assert 0 <= low <= results[key] <= high <= 1
    info = results["run_info"]
    assert (info["arch"], info["image_size"], info["val_subset"]) == ("resnet18", SIZE, None)
    assert "resize 37, center crop 32" in info["eval"]
    assert results["config"]["temperature"] == 5.0 and results["config"]["lr"] == 1e-5
    # the pictures: valid PNGs of plausible size, and the same pictures in TensorBoard
    width, height = check_png(out / "accuracy.png", (300, 200))
    assert width > height
    for epoch in pictures.picture_epochs(2):  # (1, 2)
        size = check_png(out / f"generated_epoch{epoch:03d}.png")
        side = 2 * SIZE  # 32 px images are shown enlarged x2
        assert size[1] == len(WNIDS) * (side + 2) + 2  # 3 classes
        assert size[0] > 8 * (side + 2) + 2  # 8 latents, and the row labels on the left
    check_png(out / "activation_error.png", (300, 200))
    errors = json.loads((out / "activation_error.json").read_text())
    for stage in ("before_qat", "after_qat"):
        assert len(errors[stage]["layers"]) == 17 and errors[stage]["bits"] == 4
        assert errors[stage]["n_images"] == n
    before = errors["before_qat"]
    finite = [(t, g) for t, g in zip(before["tensor"], before["granq"]) if np.isfinite(t)]
    assert all(g <= t for t, g in finite)  # per-(sample, channel) ranges never lose to one range
    events = b"".join(p.read_bytes() for p in (out / "tb").iterdir())
    for tag in (b"pictures/accuracy", b"pictures/generated", b"pictures/activation_error"):
        assert tag in events


def hand_fake_quantize(x, bits, dims):
    """The paper's asymmetric formula written out; ranges over ``dims`` (independent of granq_ao)."""
    levels = 2 ** bits - 1
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    scale = (high - low) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / safe)
    q = torch.clamp(torch.round(x / safe + zero), 0, levels)
    return torch.where(scale > 0, (q - zero) * safe, x)


def test_activation_errors_match_an_independent_computation(files):
    teacher, _, classes = build_imagenet_teacher("resnet18", str(files / "resnet18_3.pth"), SIZE)
    student = build_student("fx", teacher, ZSQConfig(act_bits=3).scheme("eager"),
                            (torch.zeros(1, 3, SIZE, SIZE),))
    dataset, _, _ = load_imagenet_val(str(files / "val"), SIZE)
    images = pictures.first_images(dataset, 6, IMAGENET_NORMALIZATION)
    assert images.shape == (6, 3, SIZE, SIZE)
    got = pictures.activation_errors(student, images, 3)
    assert len(got["layers"]) == 17 and got["layers"][0] == "features.init_block.conv.conv"
    # the first quantized activation is the teacher's first ReLU output (the student with fake-quant off)
    seen = []
    handle = teacher.features.init_block.conv.activ.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        teacher(images)
    handle.remove()
    x = seen[0]
    assert x.shape[:2] == (6, 64) and (x >= 0).all()
    for name, dims in (("tensor", (0, 1, 2, 3)), ("granq", (2, 3))):
        expected = float(torch.linalg.vector_norm(x - hand_fake_quantize(x, 3, dims)) / torch.linalg.vector_norm(x))
        assert got[name][0] == pytest.approx(expected, rel=1e-3), name
    assert got["granq"][0] < got["tensor"][0]
    # the student's switches are back as they were, and it still quantizes
    assert all(bool(m.fake_quant_enabled[0]) for m in student.modules() if hasattr(m, "fake_quant_enabled"))


def _state(trainer):
    return {**{f"g.{k}": v for k, v in trainer.generator.state_dict().items()},
            **{f"s.{k}": v for k, v in trainer.student.state_dict().items()}}


def test_resume_gives_the_same_result_as_an_uninterrupted_run(files, tmp_path):
    config = ZSQConfig(epochs=2, iters_per_epoch=2, batch_size=4, warmup_epochs=0, eval_batch_size=8, seed=5,
                       temperature=5.0, lr=1e-5)
    teacher, _, classes = build_imagenet_teacher("resnet18", str(files / "resnet18_3.pth"), SIZE)
    dataset, _, _ = load_imagenet_val(str(files / "val"), SIZE, subset=9)

    def trainer(out, **kwargs):
        torch.manual_seed(config.seed)  # the generator's initialization (as cli.main does before build_task)
        return ZSQTrainer(config, teacher, out, num_classes=classes, image_size=SIZE, eval_data=dataset,
                          normalize=IMAGENET_NORMALIZATION, generator=ImageNetGenerator(classes, img_size=SIZE),
                          tensorboard=False, progress=False, log=lambda message: None, **kwargs)

    straight = trainer(tmp_path / "a", eval_every=2)  # evaluates after epoch 2 only: the training is the same
    expected = straight.run()
    interrupted = trainer(tmp_path / "b")
    assert interrupted.run(stop_after_epochs=1) is None
    resumed = trainer(tmp_path / "b", resume=True)
    got = resumed.run()
    assert got["n_test"] == 9
    assert got["final_acc"] == expected["final_acc"] and got["correct"] == expected["correct"]
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                      for d in ("a", "b"))
    for row_a, row_b in zip(rows_a, rows_b):
        assert (row_a["loss_g"], row_a["loss_s"]) == (row_b["loss_g"], row_b["loss_s"])
    assert "test_acc" not in rows_a[0] and "test_acc" in rows_b[0]
    assert rows_a[1]["test_correct"] == rows_b[1]["test_correct"]
    assert expected["best_on_test"]["epoch"] == 2
    # the pictures survive the interruption: the before-QAT errors come back from the checkpoint
    errors_a, errors_b = (json.loads((tmp_path / d / "activation_error.json").read_text()) for d in ("a", "b"))
    assert errors_a == errors_b and errors_b["before_qat"] is not None
    for epoch in (1, 2):
        assert (tmp_path / "b" / f"generated_epoch{epoch:03d}.png").is_file()


def _cli_error(recipe, argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        recipe.main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if "error:" in line]
    assert len(message) == 1 and "Traceback" not in err, err  # one line, no traceback
    return message[0]


def test_cli_errors(files, tmp_path, capsys, monkeypatch):
    recipe = load_recipe()
    weights = ["--arch", "resnet18", "--teacher-weights", str(files / "resnet18_3.pth")]
    out = ["--out", str(tmp_path / "x")]
    # --val-dir missing, flat (images not sorted into class folders), or with empty class folders
    err = _cli_error(recipe, TINY + weights + out + ["--val-dir", str(tmp_path / "nowhere")], capsys)
    assert "does not exist" in err and "ILSVRC2012 val layout" in err
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(flat / "ILSVRC2012_val_00000001.JPEG")
    err = _cli_error(recipe, TINY + weights + out + ["--val-dir", str(flat)], capsys)
    assert "class folder" in err and "holds 1 images directly" in err
    empty = tmp_path / "empty"
    (empty / WNIDS[0]).mkdir(parents=True)
    err = _cli_error(recipe, TINY + weights + out + ["--val-dir", str(empty)], capsys)
    assert "ILSVRC2012 val layout" in err
    # a teacher whose classes differ from the data's
    err = _cli_error(recipe, TINY + weights + out + ["--val-dir", str(files / "val2")], capsys)
    assert "predicts 3 classes" in err and "2 class folders" in err
    # teachers: unknown arch, missing file, another architecture's state dict, offline download
    val = ["--val-dir", str(files / "val")]
    assert "unknown --arch" in _cli_error(recipe, TINY + out + val + ["--arch", "resnet_nope"], capsys)
    assert "unknown torchvision" in _cli_error(recipe, TINY + out + val + ["--arch", "torchvision:nope"], capsys)
    err = _cli_error(recipe, TINY + out + val + ["--arch", "resnet18", "--teacher-weights", str(tmp_path / "no.pth")],
                     capsys)
    assert "not found" in err
    err = _cli_error(recipe, TINY + out + val + ["--arch", "mobilenetv2_w1", "--teacher-weights",
                                                str(files / "resnet18_3.pth")], capsys)
    assert "does not fit pytorchcv's mobilenetv2_w1" in err

    def offline(pretrained=False, **kwargs):
        raise ConnectionError("Failed to resolve 'github.com'")

    import pytorchcv.models.resnet

    monkeypatch.setattr(pytorchcv.models.resnet, "resnet18", offline)
    err = _cli_error(recipe, TINY + out + val + ["--arch", "resnet18"], capsys)
    assert "pretrained resnet18" in err and "--teacher-weights" in err and "ConnectionError" in err
    monkeypatch.undo()
    # flags
    assert "multiple of 4" in _cli_error(recipe, TINY + weights + val + ["--image-size", "30"], capsys)
    assert "--val-subset needs --val-dir" in _cli_error(recipe, weights + ["--val-subset", "5"], capsys)
    assert "no checkpoint" in _cli_error(recipe, ["--resume", "--out", str(tmp_path / "nothing")], capsys)


def test_torchvision_teacher_and_subset(files, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    path = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)
    teacher, source, classes = build_imagenet_teacher("torchvision:resnet18", str(path), SIZE)
    assert classes == 5 and source == str(path) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="not a pytorchcv resnet18 state dict"):
        build_imagenet_teacher("resnet18", str(path), SIZE)
    a, _, description = load_imagenet_val(str(files / "val"), SIZE, subset=5)
    b, _, _ = load_imagenet_val(str(files / "val"), SIZE, subset=5)
    assert len(a) == 5 and a.indices == b.indices and a.indices == sorted(a.indices)
    assert "subset of 5 chosen with seed 0" in description
    image, label = a[0]
    assert image.shape == (3, SIZE, SIZE) and 0 <= float(image.min()) <= float(image.max()) <= 1


def test_presets():
    recipe = load_recipe()
    parser = recipe.build_parser()

    def preset(*argv):
        args = parser.parse_args(list(argv))
        recipe.check_args(args, parser)
        return recipe.preset_values(args)

    paper = preset("--preset", "paper")
    assert (paper["epochs"], paper["iters_per_epoch"], paper["batch_size"], paper["warmup_epochs"]) == (
        400, 200, 16, 50)
    assert paper["lr"] == 1e-5 and paper["lr_generator"] == 1e-3 and paper["lr_milestones"] == (350, 400)
    assert paper["temperature"] == 5.0
    r50 = preset("--preset", "paper", "--arch", "resnet50")
    assert (r50["lr"], r50["lr_milestones"], r50["warmup_epochs"], r50["entropy_lower"]) == (
        1e-4, (150, 300, 400), 100, 0.4)
    small = preset()
    assert small["epochs"] * small["iters_per_epoch"] == 200 and small["batch_size"] == 16
    args = parser.parse_args(["--preset", "paper", "--wbits", "3", "--abits", "3"])
    recipe.check_args(args, parser)
    from granq_ao.zsq import cli

    config = cli.resolve_config(args, parser, recipe.preset_values).validate()
    assert (config.weight_bits, config.act_bits, config.epochs, args.arch, args.image_size) == (
        3, 3, 400, "resnet18", 224)


def test_a_failing_picture_warns_and_leaves_the_random_state(tmp_path):
    drawer = pictures.RunPictures(tmp_path, ZSQConfig())
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)

    def broken():
        torch.rand(100)  # consumes random numbers, then fails
        raise RuntimeError("no display")

    with pytest.warns(RuntimeWarning, match="could not draw the thing: RuntimeError: no display"):
        drawer._guard("the thing", broken)
    assert torch.equal(torch.rand(3), expected)
    assert pictures.accuracy_figure([{"epoch": 1, "phase": "qat"}], None, None) is None  # no evaluation data
    assert pictures.picture_epochs(1) == (1,) and pictures.picture_epochs(400) == (1, 200, 400)


def test_generated_grid_is_labelled_by_class(tmp_path):
    """Each row of the image grid carries its class name (when the evaluation data has names) or
    index, left of the row; the images themselves are saved pixel for pixel."""
    names = ["airplane", "automobile", "bird"]
    assert pictures.row_labels([0, 2], names) == ["airplane", "bird"]
    assert pictures.row_labels([0, 111, 999]) == ["0", "111", "999"]
    assert pictures.class_names(SimpleNamespace(classes=names), 3) == names
    assert pictures.class_names(SimpleNamespace(classes=names), 10) is None  # not this run's classes
    assert pictures.class_names(torch.utils.data.DataLoader([]), 3) is None
    images = torch.zeros(3 * 4, 3, 20, 20)  # black images, white padding: only the labels are drawn in the margin
    grid = pictures.save_generated_grid(images, 4, tmp_path / "grid.png", ["airplane", "", "bird"])
    with Image.open(tmp_path / "grid.png") as image:
        pixels = np.asarray(image.convert("L")).astype(int)
    margin = pixels.shape[1] - grid.shape[2]
    assert pixels.shape[0] == grid.shape[1] and margin > 0
    assert np.abs(pixels[:, margin:] - (255 * grid.mean(0)).round().numpy()).max() <= 1
    inked = [(pixels[2 + row * 22: 22 + row * 22, :margin] < 128).any() for row in range(3)]
    assert inked == [True, False, True]  # text beside the labelled rows only
    with pytest.raises(ValueError, match="2 row labels for a grid of 3 rows"):
        pictures.save_generated_grid(images, 4, tmp_path / "bad.png", ["a", "b"])


def test_accuracy_title_is_short():
    teacher = "resnet20_cifar10 from /work/shared/data/weights/resnet20_cifar10.pth"
    assert pictures.short_title(4, 4, "granq", teacher) == "W4A4 granq | resnet20_cifar10"
    assert pictures.short_title(3, 2, "tensor", "/home/me/teachers/r18.pth") == "W3A2 tensor | r18.pth"
    assert pictures.short_title(4, 4, "granq") == "W4A4 granq"


def test_eta_format():
    from granq_ao.zsq.trainer import format_duration

    assert format_duration(59.6) == "01:00" and format_duration(3723) == "01:02:03"
    assert format_duration(90061) == "1d 01:01:01" and format_duration(float("nan")) == "?"
