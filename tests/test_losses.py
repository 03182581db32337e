"""Tests of train/losses.py against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deploy.contract import TaskSpec
from train.losses import (
    MultiTaskLoss,
    ensemble_kd_loss,
    ensemble_soft_targets,
    kd_loss,
    kd_loss_per_teacher,
    kd_per_sample,
    mask_until_eos,
    sequence_ce,
    soften,
    token_kd_loss,
)

Z = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
P = [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]


def _np_kd(z, p, t) -> float:
    """T^2 * mean over samples of sum_c p log(p / softmax(z / T)), by hand in numpy."""
    z, p = np.asarray(z) / t, np.asarray(p)
    q = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return float(t * t * np.mean(np.sum(p * np.log(p / q), axis=1)))


def test_kd_loss_matches_hand_computation():
    loss = kd_loss(torch.tensor(Z), torch.tensor(P), temperature=2.0)
    # q = [[.1863, .3072, .5065], [.2741, .2741, .4519]]; KL = [.000617, .346431]; 4 * mean = .69410
    assert loss.item() == pytest.approx(0.6940954, rel=1e-5)
    assert loss.item() == pytest.approx(_np_kd(Z, P, 2.0), rel=1e-5)


def test_t_squared_scaling_and_batchmean_not_divided_by_classes():
    z, p = torch.tensor(Z), torch.tensor(P)
    for t in (1.0, 3.0, 7.0):
        plain = F.kl_div(F.log_softmax(z / t, dim=1), p, reduction="batchmean")
        assert kd_loss(z, p, t).item() == pytest.approx(t * t * plain.item(), rel=1e-5)
        # The paper's reduction="mean" would be C = 3 times smaller.
        per_element = F.kl_div(F.log_softmax(z / t, dim=1), p, reduction="none").mean()
        assert kd_loss(z, p, t).item() == pytest.approx(3 * t * t * per_element.item(), rel=1e-5)


def test_mask_excludes_samples_and_empty_mask_is_zero_with_grad():
    z = torch.tensor(Z, requires_grad=True)
    p = torch.tensor(P)
    masked = kd_loss(z, p, 2.0, mask=torch.tensor([False, True]))
    assert masked.item() == pytest.approx(_np_kd(Z[1:], P[1:], 2.0), rel=1e-5)
    empty = kd_loss(z, p, 2.0, mask=torch.tensor([False, False]))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_ensemble_averages_only_teachers_with_the_head():
    a, b = torch.tensor(Z), torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    soft = ensemble_soft_targets([a, None, b], temperature=2.0)
    expected = (F.softmax(a / 2, dim=1) + F.softmax(b / 2, dim=1)) / 2
    assert torch.allclose(soft, expected)
    assert torch.allclose(soft.sum(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="no teacher has this head"):
        ensemble_soft_targets([None, None], 2.0)
    with pytest.raises(ValueError, match="disagree"):
        ensemble_soft_targets([a, torch.zeros(2, 4)], 2.0)


def test_kl_sum_is_mean_of_per_teacher_kd_with_the_same_gradient_as_mean_probs():
    teachers = [torch.tensor(Z), None, torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])]
    z1 = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]], requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    per_teacher = kd_loss_per_teacher(z1, teachers, 3.0)
    by_hand = np.mean([_np_kd(z1.detach(), soften(t, 3.0), 3.0) for t in teachers if t is not None])
    assert per_teacher.item() == pytest.approx(by_hand, rel=1e-5)
    mean_probs = ensemble_kd_loss(z2, teachers, 3.0, mode="mean_probs")
    assert per_teacher.item() > mean_probs.item()  # the teachers disagree: Jensen's gap
    per_teacher.backward()
    mean_probs.backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)
    assert ensemble_kd_loss(z1, teachers, 3.0, mode="kl_sum").item() == pytest.approx(per_teacher.item())
    with pytest.raises(ValueError, match="ensemble_mode"):
        ensemble_kd_loss(z1, teachers, 3.0, mode="max")


def test_mask_until_eos():
    tokens = torch.tensor([[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, 2, 6, 2, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask_until_eos(tokens), expected)


def test_token_kd_counts_tokens_up_to_eos_only():
    torch.manual_seed(0)
    student = torch.randn(2, 4, 5)
    teacher = F.softmax(torch.randn(2, 4, 5), dim=-1)
    mask = mask_until_eos(torch.tensor([[4, 2, 0, 0], [4, 4, 4, 2]]))  # 2 + 4 valid tokens
    loss = token_kd_loss(student, teacher, mask, 2.0)
    per_token = [_np_kd(student[i, j : j + 1], teacher[i, j : j + 1], 2.0)
                 for i in range(2) for j in range(4) if mask[i, j]]
    assert loss.item() == pytest.approx(np.mean(per_token), rel=1e-5)
    changed = student.clone()
    changed[0, 2:] = 100.0  # after the first row's <eos>: must not matter
    assert token_kd_loss(changed, teacher, mask, 2.0).item() == pytest.approx(loss.item())


def test_sequence_ce_ignores_pad():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 6, requires_grad=True)
    targets = torch.tensor([[4, 2, 0], [5, 5, 2]])
    picked = [F.cross_entropy(logits[i, j : j + 1], targets[i, j : j + 1]).item()
              for i in range(2) for j in range(3) if targets[i, j] != 0]
    assert sequence_ce(logits, targets).item() == pytest.approx(np.mean(picked), rel=1e-5)
    zero = sequence_ce(logits, torch.zeros(2, 3, dtype=torch.long))
    assert zero.item() == 0.0
    zero.backward()


def _cls_task(n: int = 3) -> TaskSpec:
    return TaskSpec("coarse", "classification", tuple(f"c{i}" for i in range(n)))


def test_multitask_mixes_labelled_and_unlabelled():
    alpha, t = 0.9, 2.0
    loss_fn = MultiTaskLoss([_cls_task()], alpha=alpha, temperatures={"coarse": t})
    logits = torch.tensor(Z, requires_grad=True)
    soft = {"coarse": torch.tensor(P)}
    labelled = torch.tensor([True, False])
    total, parts = loss_fn({"coarse": logits}, {"coarse": torch.tensor([2, 0])}, soft, labelled)
    ce0 = F.cross_entropy(torch.tensor(Z[:1]), torch.tensor([2])).item()
    kd = [_np_kd(Z[:1], P[:1], t), _np_kd(Z[1:], P[1:], t)]
    assert total.item() == pytest.approx(((1 - alpha) * ce0 + alpha * kd[0] + kd[1]) / 2, rel=1e-5)
    assert parts["coarse/ce"] == pytest.approx(ce0, rel=1e-5) and parts["total"] == pytest.approx(total.item())
    # The unlabelled sample's "label" is ignored: a different one gives the same loss.
    again, _ = loss_fn({"coarse": logits}, {"coarse": torch.tensor([2, 1])}, soft, labelled)
    assert again.item() == pytest.approx(total.item())
    total.backward()
    assert logits.grad.abs().sum(dim=1).gt(0).all()  # CE+KD reach row 0, KD reaches row 1


def test_multitask_without_soft_targets_is_plain_ce_and_missing_label_is_kd_only():
    loss_fn = MultiTaskLoss([_cls_task()], alpha=0.95)
    logits = torch.tensor(Z)
    labels = torch.tensor([2, -1])
    total, parts = loss_fn({"coarse": logits}, {"coarse": labels}, None, torch.tensor([True, True]))
    assert total.item() == pytest.approx(F.cross_entropy(logits[:1], labels[:1]).item(), rel=1e-5)
    assert "coarse/kd" not in parts
    total, _ = loss_fn({"coarse": logits}, {"coarse": labels}, {"coarse": torch.tensor(P)},
                       torch.tensor([True, True]))
    ce0 = F.cross_entropy(logits[:1], labels[:1]).item()
    expected = (0.05 * ce0 + 0.95 * _np_kd(Z[:1], P[:1], 4.0) + _np_kd(Z[1:], P[1:], 4.0)) / 2
    assert total.item() == pytest.approx(expected, rel=1e-5)
    nothing, _ = loss_fn({"coarse": logits.requires_grad_(True)}, {"coarse": torch.tensor([-1, -1])}, None,
                         torch.tensor([False, False]))
    assert nothing.item() == 0.0
    nothing.backward()


def test_multitask_text_task_and_task_weights():
    torch.manual_seed(2)
    tasks = [_cls_task(), TaskSpec("text", "text")]
    loss_fn = MultiTaskLoss(tasks, alpha=0.5, temperatures={"text": 1.0}, weights={"coarse": 0.0, "text": 2.0})
    tok_logits = torch.randn(2, 4, 6, requires_grad=True)
    teacher = F.softmax(torch.randn(2, 4, 6) * 3, dim=-1)
    teacher_seq = teacher.argmax(dim=-1)
    ref = torch.tensor([[4, 5, 2, 0], [0, 0, 0, 0]])  # second sample: no reference, unlabelled
    out = {"coarse": torch.tensor(Z), "text": tok_logits}
    total, parts = loss_fn(out, {"coarse": torch.tensor([0, -1]), "text": ref},
                           {"text": teacher}, torch.tensor([True, False]))
    ce0 = F.cross_entropy(tok_logits[0, :3].detach(), ref[0, :3]).item()
    kd0 = np.mean([_np_kd(tok_logits[0, j : j + 1].detach(), teacher[0, j : j + 1], 1.0) for j in range(3)])
    mask1 = mask_until_eos(teacher_seq[1:]) & (teacher_seq[1:] != 0)
    kd1 = np.mean([_np_kd(tok_logits[1, j : j + 1].detach(), teacher[1, j : j + 1], 1.0)
                   for j in range(4) if mask1[0, j]])
    text_loss = (0.5 * ce0 + 0.5 * kd0 + kd1) / 2
    assert parts["text"] == pytest.approx(text_loss, rel=1e-5)
    assert total.item() == pytest.approx(2.0 * text_loss, rel=1e-5)  # coarse weighted 0
    total.backward()
    assert tok_logits.grad[1].abs().sum() > 0


def test_multitask_rejects_bad_configuration_and_missing_inputs():
    with pytest.raises(ValueError, match="unknown tasks"):
        MultiTaskLoss([_cls_task()], temperatures={"fine": 2.0})
    with pytest.raises(ValueError, match="alpha"):
        MultiTaskLoss([_cls_task()], alpha=1.5)
    loss_fn = MultiTaskLoss([_cls_task()])
    with pytest.raises(KeyError, match="coarse"):
        loss_fn({"coarse": torch.tensor(Z)}, {}, None, torch.tensor([True, True]))


def test_multitask_loss_per_teacher_targets_average_each_teachers_kl():
    torch.manual_seed(0)
    tasks = [TaskSpec("coarse", "classification", ("a", "b", "c"))]
    logits = torch.randn(4, 3, requires_grad=True)
    teachers = torch.randn(2, 4, 3)
    per_teacher = torch.stack([soften(t, 2.0) for t in teachers])
    target = {"coarse": torch.tensor([0, -1, 2, -1])}
    labelled = torch.tensor([True, False, True, False])
    loss_fn = MultiTaskLoss(tasks, alpha=0.5, default_temperature=2.0)
    kl_sum, _ = loss_fn({"coarse": logits}, target, {"coarse": per_teacher}, labelled)
    manual = torch.stack([kd_per_sample(logits, p, 2.0) for p in per_teacher]).mean(0)
    ce = torch.nn.functional.cross_entropy(logits, target["coarse"].clamp(min=0), reduction="none")
    expected = torch.where(labelled, 0.5 * ce + 0.5 * manual, manual).mean()
    torch.testing.assert_close(kl_sum, expected)
    (g_sum,) = torch.autograd.grad(kl_sum, logits)
    mean_probs, _ = loss_fn({"coarse": logits}, target, {"coarse": per_teacher.mean(0)}, labelled)
    (g_mean,) = torch.autograd.grad(mean_probs, logits)
    torch.testing.assert_close(g_sum, g_mean)  # same gradient, the loss values differ by a constant
    assert kl_sum > mean_probs


def test_distill_step_matches_a_hand_computation_on_a_crafted_cache():
    """The student's KD step: soft targets looked up by item index, averaged over the teachers at the
    task's temperature T, and T^2 * KL mixed with CE by alpha on labelled rows (KD alone elsewhere)."""
    from types import SimpleNamespace

    from train.ensemble import SoftTargets
    from train.experiment import KDConfig
    from train.student import distill_step

    task = TaskSpec("coarse", "classification", ("a", "b", "c"))
    temp, alpha = 4.0, 0.3
    teacher = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [-2.0, 4.0, 0.0], [1.0, 1.0, 1.0]],
                            [[0.0, 1.0, 0.0], [3.0, -1.0, 0.0], [1.0, 2.0, -3.0], [0.0, 0.0, 5.0]]])  # [2, 4, 3]
    student = torch.tensor([[0.3, 1.2, -0.4], [2.0, -1.0, 0.5]])
    batch = {"index": torch.tensor([2, 0]), "labelled": torch.tensor([True, False]),
             "coarse": torch.tensor([1, -1]), "image": torch.zeros(2, 3, 4, 4)}
    loss_fn = MultiTaskLoss([task], alpha=alpha, temperatures={"coarse": temp})
    cfg = SimpleNamespace(student=SimpleNamespace(kd=KDConfig(alpha=alpha, ensemble_mode="mean_probs")))
    step = distill_step(loss_fn, SoftTargets(logits={"coarse": teacher}), cfg, None)
    loss, _ = step(lambda image, text_targets=None: {"coarse": student}, batch, "labels+kd")

    expected = []
    for row, item in enumerate([2, 0]):
        p = sum(math_softmax(teacher[k, item] / temp) for k in range(2)) / 2  # the ensemble's soft target
        q = math_softmax(student[row] / temp)
        kd = temp**2 * float((p * (p / q).log()).sum())
        ce = -float(math_softmax(student[row])[1].log()) if row == 0 else None
        expected.append((1 - alpha) * ce + alpha * kd if ce is not None else kd)
    assert float(loss) == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_distill_step_weighs_the_text_teachers_as_the_ensemble_does():
    """Token targets come from the ensemble's combination: all the weight on one teacher is that teacher
    alone, and differs from the equal vote."""
    from types import SimpleNamespace

    from train.ensemble import Combination, SoftTargets
    from train.experiment import KDConfig
    from train.student import distill_step

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 7, generator=g) * 3  # [teachers, rows, steps, vocabulary]
    tokens = torch.randint(4, 7, (4, 5), generator=g)
    student = torch.randn(2, 5, 7, generator=g)
    batch = {"index": torch.tensor([3, 1]), "labelled": torch.tensor([True, False]),
             "diagnosis": tokens[[3, 1]], "image": torch.zeros(2, 3, 4, 4)}
    loss_fn = MultiTaskLoss([TaskSpec("diagnosis", "text")], alpha=0.5, temperatures={"diagnosis": 2.0})
    cfg = SimpleNamespace(student=SimpleNamespace(kd=KDConfig(alpha=0.5, ensemble_mode="mean_probs")))

    def loss_of(soft: SoftTargets) -> float:
        step = distill_step(loss_fn, soft, cfg, "diagnosis")
        return float(step(lambda image, text_targets=None: {"diagnosis": student}, batch, "labels+kd")[0])

    first_only = Combination("quality_weighted", ["a", "b"], {"diagnosis": [1.0, 1.0]}, {"diagnosis": [1.0, 0.0]})
    weighted = loss_of(SoftTargets({}, tokens, logits, first_only))
    assert weighted == pytest.approx(loss_of(SoftTargets({}, tokens, logits[:1])), rel=1e-6)
    assert weighted != pytest.approx(loss_of(SoftTargets({}, tokens, logits)), rel=1e-3)


def math_softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x.double() - x.double().max())
    return e / e.sum()
