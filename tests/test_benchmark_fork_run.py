"""benchmarks/fork_run.py: a what-if continuation of a recipe run from its checkpoint, with the
generator frozen or the student's learning rate scaled; the run itself is left alone."""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, load_script):
    from granq_ao.zsq.data import shared_data_dir

    if not (shared_data_dir() / "weights" / "resnet20_cifar10.pth").is_file():
        pytest.skip("offline teacher not available")
    out = tmp_path_factory.mktemp("fork") / "run"
    recipe = load_script("recipes/zsq_cifar.py")
    assert recipe.main(["--epochs", "1", "--iters", "2", "--batch-size", "4", "--warmup-epochs", "0",
                        "--eval-batch-size", "512", "--fused", "eager", "--no-tensorboard", "--no-pictures",
                        "--out", str(out)]) == 0
    return out


def _weights(folder, part):
    return torch.load(folder / "checkpoint.pt", weights_only=False)[part]


def _same(a, b):
    """Whether the trained parameters (weights and biases; not BN running statistics, counters or
    fake-quant buffers, which move with every batch) are equal."""
    keys = [key for key in a if key.endswith(("weight", "bias")) and "fake_quant" not in key
            and "post_process" not in key]
    assert len(keys) > 5
    return all(torch.equal(a[key], b[key]) for key in keys)


def test_a_frozen_generator_stays_put_while_the_student_learns(base_run, load_script, tmp_path):
    fork = load_script("benchmarks/fork_run.py")
    before = (base_run / "checkpoint.pt").read_bytes()
    lines = fork.main([str(base_run), "--freeze-generator", "--epochs", "1", "--out", str(tmp_path / "frozen"),
                       "--json", str(tmp_path / "frozen.json")])
    assert (base_run / "checkpoint.pt").read_bytes() == before  # the run itself is not touched
    assert _same(_weights(tmp_path / "frozen", "generator"), _weights(base_run, "generator"))
    assert not _same(_weights(tmp_path / "frozen", "student"), _weights(base_run, "student"))
    rows = json.loads((tmp_path / "frozen.json").read_text())["fork"]
    assert [row["epoch"] for row in rows] == [2] and 0 <= rows[0]["test_acc"] <= 1
    assert lines[2].startswith("| 2 | ") and "(not yet)" in lines[2]  # the base run has no epoch 2


def test_a_student_at_learning_rate_zero_stays_put_while_the_generator_learns(base_run, load_script, tmp_path):
    fork = load_script("benchmarks/fork_run.py")
    fork.main([str(base_run), "--student-lr-scale", "0", "--epochs", "1", "--out", str(tmp_path / "still")])
    assert _same(_weights(tmp_path / "still", "student"), _weights(base_run, "student"))
    assert not _same(_weights(tmp_path / "still", "generator"), _weights(base_run, "generator"))


def test_a_fork_that_changes_nothing_or_reuses_a_folder_is_refused(base_run, load_script, tmp_path, capsys):
    fork = load_script("benchmarks/fork_run.py")
    with pytest.raises(SystemExit) as exit_info:
        fork.main([str(base_run), "--epochs", "1", "--out", str(tmp_path / "same")])
    assert exit_info.value.code == 2 and "nothing changed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        fork.main([str(base_run), "--freeze-generator", "--out", str(base_run)])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err


def test_a_fork_with_a_missing_teacher_file_says_so(base_run, load_script, tmp_path, capsys):
    fork = load_script("benchmarks/fork_run.py")
    with pytest.raises(SystemExit) as exit_info:
        fork.main([str(base_run), "--freeze-generator", "--epochs", "1", "--out", str(tmp_path / "f"),
                   "--teacher-weights", str(tmp_path / "absent.pth")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "teacher weights file not found" in err and "absent.pth" in err
    assert not (tmp_path / "f").exists()  # nothing left that would block the corrected command
