"""ZSQ losses vs independent formulas written here (numpy, float64)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from granq_ao.zsq import losses as L


def np_softmax(v):
    v = v - v.max(axis=-1, keepdims=True)
    e = np.exp(v)
    return e / e.sum(axis=-1, keepdims=True)


def np_entropy(v):
    p = np_softmax(v)
    return -(p * np.log(p)).sum(axis=-1)


def np_margin(t, s, lower=0.1, upper=0.8):
    h = np_entropy(t - s)
    h_max = math.log(t.shape[1])
    hn = (h - h.min()) / (h_max - h.min())
    return np.mean(np.maximum(lower - hn, 0)) + np.mean(np.maximum(hn - upper, 0))


def np_ce(v, y):
    p = np_softmax(v)
    return float(np.mean(-np.log(p[np.arange(len(y)), y])))


def logits(n, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, c, generator=g, dtype=torch.float64) * scale)


def test_softmax_entropy_matches_formula():
    t, _ = logits(7, 10, 0)
    for temperature in (1.0, 20.0):
        expected = np_entropy(t.numpy() / temperature)
        np.testing.assert_allclose(L.softmax_entropy(t, temperature).numpy(), expected, rtol=1e-12)
    # uniform logits -> log C
    assert L.softmax_entropy(torch.zeros(2, 100)).tolist() == pytest.approx([math.log(100)] * 2)


@pytest.mark.parametrize("batch,classes", [(16, 10), (200, 100), (200, 10), (3, 100)])
def test_margin_loss_any_batch_size(batch, classes):
    t, s = logits(batch, classes, batch)
    # spread the disagreement entropies so that both hinge sides are active
    s[: batch // 3] = t[: batch // 3] * 0.9
    expected = np_margin(t.numpy(), s.numpy())
    got = L.entropy_margin_loss(t, s)
    assert float(got) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert float(got) > 0


def test_margin_loss_bounds_and_gradient():
    t, s = logits(16, 10, 1)
    s.requires_grad_(True)
    loss = L.entropy_margin_loss(t, s, lower=0.1, upper=0.8)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # with bounds [0, 1] nothing is penalized
    assert float(L.entropy_margin_loss(t, s.detach(), lower=0.0, upper=1.0)) == 0.0


def test_margin_loss_batch_of_one_and_uniform_batch_are_finite():
    t, s = logits(1, 10, 2)
    assert float(L.entropy_margin_loss(t, s)) == pytest.approx(0.1)  # h' = 0 -> lower bound hinge
    same = torch.zeros(4, 10)
    assert math.isfinite(float(L.entropy_margin_loss(same, same)))


def test_generator_loss_is_weighted_sum_of_independent_terms():
    t, s = logits(16, 10, 3)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    mean = torch.randn(5, dtype=torch.float64)
    var = torch.rand(5, dtype=torch.float64)
    run_mean = torch.randn(5, dtype=torch.float64)
    run_var = torch.rand(5, dtype=torch.float64) + 0.5
    records = [(mean, var, run_mean, run_var), (mean * 2, var * 2, run_mean, run_var)]
    total, parts = L.generator_loss(t, s, y, records, alpha_ds=0.2, alpha_as=0.1, beta=1.0, gamma=1.0)
    bns = np.mean([np.mean((m.numpy() - run_mean.numpy()) ** 2) + np.mean((v.numpy() - run_var.numpy()) ** 2)
                   for m, v, _, _ in records])
    ce_ds = np_ce((t - s).numpy(), y.numpy())
    ce_as = np_ce((t + s).numpy(), y.numpy())
    margin = np_margin(t.numpy(), s.numpy())
    assert float(parts["bns"]) == pytest.approx(bns, rel=1e-10)
    assert float(parts["ce_ds"]) == pytest.approx(ce_ds, rel=1e-10)
    assert float(parts["ce_as"]) == pytest.approx(ce_as, rel=1e-10)
    assert float(parts["margin"]) == pytest.approx(margin, rel=1e-10, abs=1e-12)
    assert float(total) == pytest.approx(margin + 0.2 * ce_ds + 0.1 * ce_as + bns, rel=1e-10)


def test_record_batchnorm_inputs_biased_variance_and_hook_removal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(6, 3, 8, 8)
    with L.record_batchnorm_inputs(model) as records:
        model(x)
    assert len(records) == 2
    bn_in = model[0](x).detach().numpy()
    mean, var, run_mean, run_var = records[0]
    np.testing.assert_allclose(mean.detach().numpy(), bn_in.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.detach().numpy(), bn_in.var(axis=(0, 2, 3), ddof=0), rtol=1e-5, atol=1e-6)
    assert run_mean is model[1].running_mean and run_var is model[1].running_var
    model(x)  # hooks removed on exit: nothing more recorded
    assert len(records) == 2
    expected = np.mean([np.mean((m.detach().numpy() - rm.numpy()) ** 2) + np.mean((v.detach().numpy() - rv.numpy()) ** 2)
                        for m, v, rm, rv in records])
    assert float(L.batchnorm_statistics_loss(records).detach()) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="no BatchNorm"):
        L.batchnorm_statistics_loss([])


def test_student_losses_match_formulas():
    t, s = logits(16, 10, 4)
    temperature = 20.0
    entropy = np_entropy((t - s).numpy() / temperature)
    assert float(L.entropy_distillation_loss(t, s, temperature)) == pytest.approx(
        -(temperature ** 2) * entropy.mean(), rel=1e-12)
    p_t = np_softmax(t.numpy() / temperature)
    p_s = np_softmax(s.numpy() / temperature)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean()
    assert float(L.kl_distillation_loss(t, s, temperature)) == pytest.approx(temperature ** 2 * kl, rel=1e-10)
    assert float(L.kl_distillation_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-12)
    assert float(L.student_loss("kl", t, s, temperature)) == float(L.kl_distillation_loss(t, s, temperature))
    with pytest.raises(ValueError, match="unknown student loss"):
        L.student_loss("mse", t, s, temperature)


def test_entropy_loss_minimum_is_student_equal_teacher_up_to_a_constant():
    t, s = logits(8, 10, 5)
    temperature = 20.0
    best = -(temperature ** 2) * math.log(10)
    assert float(L.entropy_distillation_loss(t, t + 1.5, temperature)) == pytest.approx(best, rel=1e-12)
    assert float(L.entropy_distillation_loss(t, s, temperature)) > best


def test_gdfq_generator_loss_is_ce_on_teacher_plus_weighted_bns():
    t, s = logits(16, 10, 5)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    run_mean, run_var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    records = [(torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64), run_mean, run_var)]
    total, parts = L.gdfq_generator_loss(t, y, records, gamma=0.1)
    bns = np.mean([np.mean((m.numpy() - run_mean.numpy()) ** 2) + np.mean((v.numpy() - run_var.numpy()) ** 2)
                   for m, v, _, _ in records])
    ce = np_ce(t.numpy(), y.numpy())
    assert set(parts) == {"bns", "ce"}
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-10)
    assert float(total) == pytest.approx(ce + 0.1 * bns, rel=1e-10)
    # no student term: the student's logits do not enter (the signature has none) and the
    # gradient reaches the teacher logits only through CE
    t_grad = t.clone().requires_grad_(True)
    L.gdfq_generator_loss(t_grad, y, records, gamma=0.1)[0].backward()
    expected = (torch.softmax(t, 1) - nn.functional.one_hot(y, 10)) / 16
    assert torch.allclose(t_grad.grad, expected, atol=1e-12)


def test_standardized_bns_is_scale_free_and_matches_its_formula():
    from granq_ao.zsq.losses import batchnorm_statistics_loss

    torch.manual_seed(0)
    mean, var = torch.randn(8), torch.rand(8) + 0.5
    running_mean, running_var = torch.randn(8), torch.rand(8) + 0.5
    records = [(mean, var, running_mean, running_var)]
    scale = running_var + 1e-5
    expected = (((mean - running_mean) ** 2) / scale).mean() + (((var - running_var) / scale) ** 2).mean()
    assert torch.allclose(batchnorm_statistics_loss(records, standardized=True), expected)
    # inputs 255x larger (raw pixels): the paper's loss grows ~255^4 in its variance term, the standardized one not
    k = 255.0
    big = [(k * mean, k * k * var, k * running_mean, k * k * running_var)]
    assert float(batchnorm_statistics_loss(big)) > 1e8 * float(batchnorm_statistics_loss(records))
    assert torch.allclose(batchnorm_statistics_loss(big, standardized=True), expected, rtol=1e-4)
