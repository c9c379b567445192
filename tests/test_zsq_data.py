"""Evaluation data and statistics: normalization, the offline subset, Wilson and McNemar."""
import math

import numpy as np
import pytest
import torch

from granq_ao.zsq import data as D
from granq_ao.zsq import evaluation as E


def test_wilson_interval_matches_formula_and_known_value():
    k, n, z = 946, 1017, 1.959963984540054
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert E.wilson_interval(k, n) == pytest.approx((center - half, center + half), rel=1e-12)
    low, high = E.wilson_interval(k, n)
    assert (round(100 * low, 1), round(100 * high, 1)) == (91.3, 94.4)
    assert E.wilson_interval(0, 10)[0] == 0.0 and E.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        E.wilson_interval(3, 0)


def test_mcnemar_exact_p():
    assert E.mcnemar_exact_p(0, 0) == 1.0
    # n = 10 discordant, 1 vs 9: 2 * (C(10,0) + C(10,1)) / 2^10
    assert E.mcnemar_exact_p(9, 1) == pytest.approx(2 * 11 / 1024)
    assert E.mcnemar_exact_p(1, 9) == E.mcnemar_exact_p(9, 1)
    assert E.mcnemar_exact_p(5, 5) == 1.0


def test_normalization_formula():
    x = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    out = D.normalize_uint8_images(x, "cifar100")
    mean, std = D.CIFAR_NORMALIZATION["cifar100"]
    expected = (x.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_offline_subset_and_missing_data_messages(tmp_path, monkeypatch):
    if (D.shared_data_dir() / "cifar10" / "test_subset.npz").is_file():
        evalset = D.load_cifar_test("cifar10")
        assert len(evalset) == 1017 and evalset.images.shape == (1017, 3, 32, 32)
        assert evalset.labels[:5].tolist() == [3, 8, 8, 0, 6]  # the official test_batch starts so
        assert evalset.classes[:4] == ("airplane", "automobile", "bird", "cat") and len(evalset.classes) == 10
        assert [evalset.classes[y] for y in evalset.labels[:2]] == ["cat", "ship"]
    monkeypatch.setenv("GRANQ_DATA_DIR", str(tmp_path))
    with pytest.raises(D.DataNotFoundError, match="test_subset.npz does not exist"):
        D.load_cifar_test("cifar10")
    with pytest.raises(D.DataNotFoundError, match="torchvision's layout"):
        D.load_cifar_test("cifar100", data_root=str(tmp_path / "cifar"))
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_cifar_test("mnist")


def test_per_image_correct_is_the_same_sharded_or_not():
    torch.manual_seed(0)
    evalset = D.EvalSet(torch.randn(50, 3, 4, 4), torch.randint(0, 3, (50,)), "cifar10", "test")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    whole = E.per_image_correct(model, evalset, batch_size=8)
    shards = [E.per_image_correct(model, evalset, batch_size=8, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(sum(shards), whole)
    expected = (model(evalset.images).argmax(1) == evalset.labels).long()
    assert torch.equal(whole, expected)
    counts = [E.evaluate_accuracy(model, evalset, 8, rank=r, world_size=3) for r in range(3)]
    assert sum(c for c, _ in counts) == int(expected.sum()) and sum(t for _, t in counts) == 50


def test_sharded_evaluation_of_a_dataset_reads_only_this_process_images():
    """A map-style Dataset (an ImageFolder) is decoded only where the batch is this process's."""

    class CountingDataset(torch.utils.data.Dataset):
        def __init__(self, images, labels):
            self.images, self.labels, self.read = images, labels, []

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, index):
            self.read.append(index)
            return self.images[index], int(self.labels[index])

    torch.manual_seed(0)
    images, labels = torch.randn(45, 3, 4, 4), torch.randint(0, 3, (45,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    expected = (model(images).argmax(1) == labels).long()
    shards, reads = [], []
    for rank in range(3):
        dataset = CountingDataset(images, labels)
        shards.append(E.per_image_correct(model, dataset, batch_size=8, rank=rank, world_size=3))
        reads.append(sorted(dataset.read))
    assert torch.equal(sum(shards), expected)
    # batches of 8: rank r owns batches r, r + 3 (the last one, images 40..44, is rank 2's)
    assert reads[0] == list(range(0, 8)) + list(range(24, 32))
    assert reads[2] == list(range(16, 24)) + list(range(40, 45))
    assert sorted(sum(reads, [])) == list(range(45))  # each image read once, by one process
