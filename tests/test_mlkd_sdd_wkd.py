"""MLKD, SDD and WKD-L against transcriptions of their authors' code: value and gradient in float64.

The ``authors_*`` functions below transcribe (not import) the authors' public implementations, with their
indexing and reductions kept as written (``.cuda()`` calls dropped, CPU only):

- MLKD: github.com/Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py`` (``kd_loss``,
  ``cc_loss``, ``bc_loss``, ``KD_ours.forward_train``; the repository has no ``MLKD.py``) at commit
  5ee473fcf193dfb00a0598b64d0acfe6ad58a482, ``KD.TEMPERATURE`` 4 (``mdistiller/engine/cfg.py``).
- SDD: github.com/shicaiwei123/SDD-CVPR2024 at commit e412036c6b7b67d8ed25418d2dedad223ab49a71:
  ``mdistiller/models/cifar/utils.py`` (``SPP``), the region logits of ``mdistiller/models/cifar/resnet.py``
  (``ResNet.forward``: ``patch_score = fc(x_spp)``) and ``mdistiller/distillers/KD.py`` (``sdd_kd_loss``).
- WKD-L: github.com/JiamingLv/WKD, ``mdistiller/distillers/WKD.py`` (``sinkhorn``, ``wkd_logit_loss``,
  ``wkd_logit_loss_with_speration``, the ``COST_MATRIX == "fc"`` cost and sharpening of ``WKD.__init__`` and the
  weight decay of ``forward_train``) at commit 214cf8868c2b8e45781f238b8f0e47c2e4e38190. Their
  ``.to(torch.float32)`` casts are dropped so both sides run in float64 (the term keeps float64 as well).

Tolerance: relative error <= 1e-10 (plus 1e-12 absolute) on values and gradients, float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import MLKD, SDD, TERMS, UNLABELLED, WKDL, DistillationLoss
from kd_lightning.losses.logit_multilevel import region_features
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models.cifar import resnet8

RTOL, ATOL = 1e-10, 1e-12


# ------------------------------------------------------------------------------------------------- MLKD
def authors_kd_loss(logits_student, logits_teacher, temperature, reduce=True):
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    if reduce:
        loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    else:
        loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1)
    loss_kd *= temperature**2
    return loss_kd


def authors_cc_loss(logits_student, logits_teacher, temperature):
    _batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student.transpose(1, 0), pred_student)
    teacher_matrix = torch.mm(pred_teacher.transpose(1, 0), pred_teacher)
    return ((teacher_matrix - student_matrix) ** 2).sum() / class_num


def authors_bc_loss(logits_student, logits_teacher, temperature):
    batch_size, _class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student, pred_student.transpose(1, 0))
    teacher_matrix = torch.mm(pred_teacher, pred_teacher.transpose(1, 0))
    return ((teacher_matrix - student_matrix) ** 2).sum() / batch_size


def authors_mlkd(s_weak, s_strong, t_weak, t_strong, temperature=4.0, kd_w=1.0):
    """``KD_ours.forward_train`` from the logits on: loss_kd + loss_cc + loss_bc (the CE terms left out)."""
    pred_teacher_weak = F.softmax(t_weak.detach(), dim=1)
    confidence, _ = pred_teacher_weak.max(dim=1)
    conf_thresh = np.percentile(confidence.detach().cpu().numpy().flatten(), 50)
    mask = confidence.le(conf_thresh).bool()
    class_confidence = torch.sum(pred_teacher_weak, dim=0).detach()
    class_confidence_thresh = np.percentile(class_confidence.cpu().numpy().flatten(), 50)
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()
    temps = [temperature, 3.0, 5.0, 2.0, 6.0]
    loss_kd_weak = sum(kd_w * ((authors_kd_loss(s_weak, t_weak, tt) * mask).mean()) for tt in temps)
    loss_kd_strong = (
        sum(kd_w * authors_kd_loss(s_strong, t_strong, tt) for tt in temps[:3])
        + kd_w * authors_kd_loss(s_weak, t_weak, 2.0)  # as written: T = 2 and 6 on the weak view
        + kd_w * authors_kd_loss(s_weak, t_weak, 6.0)
    )
    loss_cc_weak = sum(kd_w * ((authors_cc_loss(s_weak, t_weak, tt) * class_conf_mask).mean()) for tt in temps)
    loss_bc_weak = sum(kd_w * ((authors_bc_loss(s_weak, t_weak, tt) * mask).mean()) for tt in temps)
    return loss_kd_weak + loss_kd_strong + loss_cc_weak + loss_bc_weak


def logits(seed: int, batch: int = 7, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 4
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, labels


def value_and_grad(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [x.clone().requires_grad_() for x in inputs]
    value = fn(*leaves)
    return (value.detach(), *torch.autograd.grad(value, leaves))


def assert_same(ours: tuple[torch.Tensor, ...], theirs: tuple[torch.Tensor, ...]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("seed", "batch", "classes"), [(0, 7, 10), (1, 8, 5), (2, 2, 3)])
def test_mlkd_matches_the_authors_code_with_one_view_for_both(seed: int, batch: int, classes: int) -> None:
    """The term is the authors' loss with the strong view equal to the weak one (the one view the data gives)."""
    student, teacher, _ = logits(seed, batch, classes)
    term = MLKD()
    assert_same(
        value_and_grad(lambda s: term(s, teacher), student),
        value_and_grad(lambda s: authors_mlkd(s, s, teacher, teacher), student),
    )


def test_mlkd_with_two_views_differs_by_the_strong_instance_terms() -> None:
    """What the one-view term leaves out: with a distinct strong view the authors' loss is the term on the weak
    view plus KD_T(strong) - KD_T(weak) for T = 4, 3, 5 (their unmasked strong-view instance terms)."""
    weak_s, weak_t, _ = logits(3)
    strong_s, strong_t, _ = logits(4)
    difference = sum(
        authors_kd_loss(strong_s, strong_t, tt) - authors_kd_loss(weak_s, weak_t, tt) for tt in (4.0, 3.0, 5.0)
    )
    expected = authors_mlkd(weak_s, strong_s, weak_t, strong_t)
    torch.testing.assert_close(MLKD()(weak_s, weak_t) + difference, expected, rtol=RTOL, atol=ATOL)


def test_mlkd_masks_scale_by_the_fraction_at_or_below_the_median() -> None:
    """Odd batch of distinct confidences: (B + 1) / 2 of B samples are <= the median, so m = 4/7 exactly."""
    student, teacher, _ = logits(5, batch=7)
    term = MLKD(temperatures=[4.0])
    pt = F.softmax(teacher, -1)
    m = 4 / 7
    c = float((pt.sum(0) <= pt.sum(0).median()).double().mean())  # 10 classes: torch's lower median is <= numpy's
    ps4, pt4 = F.softmax(student / 4, -1), F.softmax(teacher / 4, -1)
    kd = F.kl_div(F.log_softmax(student / 4, -1), pt4, reduction="batchmean") * 16
    cc = ((pt4.T @ pt4 - ps4.T @ ps4) ** 2).sum() / 10
    bc = ((pt4 @ pt4.T - ps4 @ ps4.T) ** 2).sum() / 7
    assert c == pytest.approx(0.5)
    torch.testing.assert_close(term(student, teacher), (1 + m) * kd + c * cc + m * bc, rtol=RTOL, atol=ATOL)
    assert term(teacher, teacher).item() == pytest.approx(0.0, abs=1e-12)


# -------------------------------------------------------------------------------------------------- SDD
class AuthorsSPP(nn.Module):
    def __init__(self, M=None):
        super().__init__()
        self.pooling_4x4 = nn.AdaptiveAvgPool2d((4, 4))
        self.pooling_2x2 = nn.AdaptiveAvgPool2d((2, 2))
        self.pooling_1x1 = nn.AdaptiveAvgPool2d((1, 1))
        self.M = M

    def forward(self, x):
        x_4x4 = self.pooling_4x4(x)
        x_2x2 = self.pooling_2x2(x_4x4)
        x_1x1 = self.pooling_1x1(x_4x4)
        x_4x4_flatten = torch.flatten(x_4x4, start_dim=2, end_dim=3)
        x_2x2_flatten = torch.flatten(x_2x2, start_dim=2, end_dim=3)
        x_1x1_flatten = torch.flatten(x_1x1, start_dim=2, end_dim=3)
        if self.M == "[1,2,4]":
            x_feature = torch.cat((x_1x1_flatten, x_2x2_flatten, x_4x4_flatten), dim=2)
        elif self.M == "[1,2]":
            x_feature = torch.cat((x_1x1_flatten, x_2x2_flatten), dim=2)
        elif self.M == "[1]":
            x_feature = x_1x1_flatten
        else:
            raise NotImplementedError("ERROR M")
        return x_feature


def authors_patch_score(x, spp, fc, class_num):
    x_spp = spp(x)
    x_spp = x_spp.permute((2, 0, 1))
    m, b, c = x_spp.shape[0], x_spp.shape[1], x_spp.shape[2]
    x_spp = torch.reshape(x_spp, (m * b, c))
    patch_score = fc(x_spp)
    patch_score = torch.reshape(patch_score, (m, b, class_num))
    return patch_score.permute((1, 2, 0))


def authors_sdd_kd_loss(out_s_multi, out_t_multi, T, target):
    out_s_multi = out_s_multi.permute(2, 0, 1)
    out_t_multi = out_t_multi.permute(2, 0, 1)
    out_t = torch.reshape(out_t_multi, (out_t_multi.shape[0] * out_t_multi.shape[1], out_t_multi.shape[2]))
    out_s = torch.reshape(out_s_multi, (out_s_multi.shape[0] * out_s_multi.shape[1], out_s_multi.shape[2]))
    target_r = target.repeat(out_t_multi.shape[0])
    p_s = F.log_softmax(out_s / T, dim=1)
    p_t = F.softmax(out_t / T, dim=1)
    loss_kd = F.kl_div(p_s, p_t, reduction="none") * (T**2)
    nan_index = torch.isnan(loss_kd)
    loss_kd[nan_index] = torch.tensor(0.0)
    loss_kd = torch.sum(loss_kd, dim=1)
    out_t_predict = torch.argmax(out_t, dim=1)
    mask_true = out_t_predict == target_r
    mask_false = out_t_predict != target_r
    global_prediction = out_t_predict[0 : len(target)]
    global_prediction_true_mask = global_prediction == target
    global_prediction_false_mask = global_prediction != target
    global_prediction_true_mask_repeat = global_prediction_true_mask.clone().repeat(out_t_multi.shape[0])
    global_prediction_false_mask_repeat = global_prediction_false_mask.clone().repeat(out_t_multi.shape[0])
    mask_false[global_prediction_false_mask_repeat] = False
    mask_false[0 : len(target)] = False
    gt_lw = mask_false
    mask_true[global_prediction_true_mask_repeat] = False
    mask_true[0 : len(target)] = False
    gw_lt = mask_true
    mask_false = out_t_predict != target_r
    mask_true = out_t_predict == target_r
    index = torch.zeros_like(loss_kd).float()
    mask_false[global_prediction_true_mask_repeat] = False
    gw_lw = mask_false
    mask_true[global_prediction_false_mask_repeat] = False
    gt_lt = mask_true
    index[gw_lw] = 1.0
    index[gt_lt] = 1.0
    index[gw_lt] = 2
    index[gt_lw] = 2
    index = index.to(loss_kd.dtype)  # the authors' float32 index, in the loss's dtype
    return torch.sum(loss_kd * index) / target_r.shape[0]


class Headed(nn.Module):
    """A stand-in model: only its classifier ``head`` matters to SDD and WKD-L."""

    def __init__(self, features: int, classes: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(features, classes).double()


def sdd_inputs(seed: int, classes: int = 4, batch: int = 6, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    fs = torch.randn(batch, 5, size, size, generator=generator, dtype=torch.float64)
    ft = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64) * 2
    student, teacher = Headed(5, classes, seed), Headed(3, classes, seed + 100)
    global_top1 = teacher.head(ft.mean(dim=(2, 3))).argmax(-1)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    labels[::2] = global_top1[::2]  # half the rows: the teacher's global prediction is right
    return fs, ft, labels, student, teacher


@pytest.mark.parametrize(
    ("seed", "scales", "m"), [(0, [1, 2, 4], "[1,2,4]"), (1, [1, 2, 4], "[1,2,4]"), (2, [1, 2], "[1,2]")]
)
def test_sdd_matches_the_authors_code(seed: int, scales: list[int], m: str) -> None:
    fs, ft, labels, student, teacher = sdd_inputs(seed)
    term = SDD(scales=scales, temperature=4.0)
    term.bind_models({"student": student, "teacher": teacher}, "loss.terms.sdd")
    term.setup_shapes(fs, ft, "loss.terms.sdd")
    spp = AuthorsSPP(m)

    def authors(s, weight, bias):
        head = lambda x: F.linear(x, weight, bias)  # noqa: E731 - the student's fc, as leaves for the gradient
        with torch.no_grad():
            patch_t = authors_patch_score(ft, spp, teacher.head, 4)
        return authors_sdd_kd_loss(authors_patch_score(s, spp, head, 4), patch_t, 4.0, labels)

    def ours(s, weight, bias):
        with torch.no_grad():
            student.head.weight.copy_(weight)
            student.head.bias.copy_(bias)
        student.head.zero_grad()
        value = term(s, ft, labels)
        return value

    w, b = student.head.weight.detach().clone(), student.head.bias.detach().clone()
    expected = value_and_grad(authors, fs, w, b)
    s = fs.clone().requires_grad_()
    value = ours(s, w, b)
    value.backward()
    assert_same((value.detach(), s.grad, student.head.weight.grad, student.head.bias.grad), expected)


def test_sdd_weights_complementary_regions_and_its_global_region_is_the_logit() -> None:
    fs, ft, labels, student, teacher = sdd_inputs(3)
    term = SDD(temperature=4.0)
    term.bind_models({"student": student, "teacher": teacher}, "k")
    regions = teacher.head(region_features(ft, [1, 2, 4]))
    torch.testing.assert_close(regions[:, 0], teacher.head(ft.mean(dim=(2, 3))), rtol=RTOL, atol=ATOL)
    correct = regions.argmax(-1) == labels.unsqueeze(-1)
    complementary = correct != correct[:, :1]
    assert complementary.any() and (~complementary).any()
    plain = SDD(temperature=4.0, complementary_weight=1.0)
    plain.bind_models({"student": student, "teacher": teacher}, "k")
    ratio_free = term(fs, ft, labels) - plain(fs, ft, labels)  # = mean over regions of the complementary KLs
    zs = student.head(region_features(fs, [1, 2, 4]))
    rows = (F.softmax(regions / 4, -1) * (F.log_softmax(regions / 4, -1) - F.log_softmax(zs / 4, -1))).sum(-1) * 16
    torch.testing.assert_close(ratio_free, (rows * complementary).mean(), rtol=RTOL, atol=ATOL)
    same = SDD(temperature=4.0)
    same.bind_models({"student": teacher, "teacher": teacher}, "k")
    assert same(ft, ft, labels).item() == pytest.approx(0.0, abs=1e-12)


def test_sdd_runs_in_a_method_on_cifar_models_and_refuses_a_map_the_head_does_not_pool() -> None:
    torch.manual_seed(0)
    module = DistillationModule(
        student=resnet8(num_classes=5), teacher=resnet8(num_classes=5), loss=DistillationLoss({"sdd": SDD()}),
        optimizer=torch.optim.SGD, num_classes=5,
    )  # fmt: skip
    x = torch.randn(4, 3, 32, 32)
    module.setup_for(x)
    value = module.training_step((x, torch.tensor([0, 1, 2, 3])), 0)
    assert torch.isfinite(value) and value.item() > 0
    wrong = DistillationModule(
        student=resnet8(num_classes=5), teacher=resnet8(num_classes=5),
        loss=DistillationLoss({"sdd": SDD(student={"layer": "layer2"})}), optimizer=torch.optim.SGD, num_classes=5,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^loss\.terms\.sdd\.student_head=head does not take the 32 channels"):
        wrong.setup_for(x)


# ------------------------------------------------------------------------------------------------ WKD-L
def authors_sinkhorn(w1, w2, cost, reg=0.05, max_iter=10):
    bs, dim = w1.shape
    w1 = w1.unsqueeze(-1)
    w2 = w2.unsqueeze(-1)
    u = 1 / dim * torch.ones_like(w1, device=w1.device, dtype=w1.dtype)
    K = torch.exp(-cost / reg)
    Kt = K.transpose(2, 1)
    for _ in range(max_iter):
        v = w2 / (torch.bmm(Kt, u) + 1e-8)
        u = w1 / (torch.bmm(K, v) + 1e-8)
    return u.reshape(bs, -1, 1) * K * v.reshape(bs, 1, -1)


def authors_wkd_logit_loss(logits_student, logits_teacher, temperature, cost_matrix, sinkhorn_lambda, sinkhorn_iter):
    pred_student = F.softmax(logits_student / temperature, dim=-1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=-1)
    cost_matrix = F.relu(cost_matrix) + 1e-8
    flow = authors_sinkhorn(pred_student, pred_teacher, cost_matrix, reg=sinkhorn_lambda, max_iter=sinkhorn_iter)
    return (flow * cost_matrix).sum(-1).sum(-1).mean()


def authors_wkd_l(logits_student, logits_teacher, gt_label, temperature, gamma, cost_matrix, lam=0.05, iters=10):
    label = gt_label.view(len(gt_label), 1)
    N, c = logits_student.shape
    s_i = F.log_softmax(logits_student, dim=1)
    t_i = F.softmax(logits_teacher, dim=1)
    s_t = torch.gather(s_i, 1, label)
    t_t = torch.gather(t_i, 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logits_student).scatter_(1, label, 0).bool()
    logits_student = logits_student[mask].reshape(N, -1)
    logits_teacher = logits_teacher[mask].reshape(N, -1)
    cost_matrix = cost_matrix.repeat(N, 1, 1)
    gd_mask = mask.unsqueeze(1) * mask.unsqueeze(2)
    cost_matrix = cost_matrix[gd_mask].reshape(N, c - 1, c - 1)
    loss_wkd = authors_wkd_logit_loss(logits_student, logits_teacher, temperature, cost_matrix, lam, iters)
    return loss_t + gamma * loss_wkd


def authors_fc_cost(fc_weight, sharpen):
    proto_normed = F.normalize(fc_weight, p=2, dim=-1)
    cosine_sim = proto_normed.matmul(proto_normed.transpose(-1, -2))
    dist = 1 - cosine_sim
    if sharpen != 0:
        dist = 1 - torch.exp(-sharpen * dist)
    return dist


def authors_weight(epoch: int, weight: float, decay_start_epoch: int, epochs: int) -> float:
    if epoch > decay_start_epoch:
        return 0.5 * weight * (1 + math.cos((epoch - decay_start_epoch) / (epochs - decay_start_epoch) * math.pi))
    return weight


def bound_wkd(classes: int = 10, seed: int = 0, **kwargs) -> tuple[WKDL, Headed]:
    teacher = Headed(6, classes, seed)
    term = WKDL(**kwargs)
    term.bind_models({"teacher": teacher}, "loss.terms.wkd_l")
    return term, teacher


@pytest.mark.parametrize(
    ("temp", "gamma", "sharpen", "lam", "iters"),
    [(8.0, 600.0, 1.0, 0.05, 10), (2.0, 30.0, 1.0, 0.05, 10), (4.0, 1.0, 0.0, 0.1, 30), (1.0, 5.0, 2.0, 0.5, 3)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_wkd_l_matches_the_authors_code(temp, gamma, sharpen, lam, iters, seed) -> None:
    student, teacher, labels = logits(seed)
    term, model = bound_wkd(
        seed=seed, gamma=gamma, temperature=temp, sharpen=sharpen, sinkhorn_lambda=lam, sinkhorn_iterations=iters
    )
    cost = authors_fc_cost(model.head.weight.detach(), sharpen)
    assert_same(
        value_and_grad(lambda s: term(s, teacher, labels), student),
        value_and_grad(lambda s: authors_wkd_l(s, teacher, labels, temp, gamma, cost, lam, iters), student),
    )


def test_wkd_l_gamma_decays_as_the_authors_loop_and_unlabelled_rows_use_the_top1() -> None:
    term, model = bound_wkd(gamma=600.0, temperature=8.0, decay_start_epoch=150, decay_end_epoch=240)
    for epoch in (0, 148, 149, 150, 200, 239):
        term.start_epoch(epoch)
        assert term.current_gamma == pytest.approx(authors_weight(epoch + 1, 600.0, 150, 240), abs=1e-12)
    constant, _ = bound_wkd(gamma=600.0)
    constant.start_epoch(500)
    assert constant.current_gamma == 600.0
    student, teacher, labels = logits(2)
    labels[[1, 4]] = UNLABELLED
    filled = torch.where(labels == UNLABELLED, teacher.argmax(-1), labels)
    cost = authors_fc_cost(model.head.weight.detach(), 1.0)
    expected = authors_wkd_l(student, teacher, filled, 8.0, term.current_gamma, cost)
    torch.testing.assert_close(term(student, teacher, labels), expected, rtol=RTOL, atol=ATOL)


def test_wkd_l_reads_the_teachers_current_classifier_in_a_method() -> None:
    torch.manual_seed(0)
    teacher = resnet8(num_classes=5)
    loss = DistillationLoss({"wkd_l": WKDL(temperature=4.0)}, alpha=0.5)
    module = DistillationModule(student=resnet8(num_classes=5), teacher=teacher, loss=loss, optimizer=torch.optim.SGD,
                                num_classes=5)  # fmt: skip
    term = module.loss.terms["wkd_l"]
    assert term.heads["teacher"] is teacher.head and not any("head" in n for n, _ in term.named_parameters())
    x = torch.randn(4, 3, 32, 32)
    assert torch.isfinite(module.training_step((x, torch.tensor([0, 1, 2, 3])), 0))
    with torch.no_grad():
        teacher.head.weight.mul_(-1).add_(0.3)
    cost = authors_fc_cost(teacher.head.weight.detach().double(), 1.0)
    torch.testing.assert_close(term.cost(5, cost), F.relu(cost) + 1e-8, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["mlkd", "sdd", "wkd_l"])
def test_bf16_autocast_in_a_method_stays_finite_and_float32(name: str) -> None:
    """Under bf16 autocast (maps, heads and logits in bf16), each term upcasts and returns a finite float32."""
    torch.manual_seed(0)
    loss = DistillationLoss({name: TERMS[name]()}, alpha=0.5)
    module = DistillationModule(student=resnet8(num_classes=5), teacher=resnet8(num_classes=5), loss=loss,
                                optimizer=torch.optim.SGD, num_classes=5)  # fmt: skip
    x = torch.randn(4, 3, 32, 32)
    module.setup_for(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = {"student": module.student_outputs(x * 30), "teacher": module.teacher_outputs(x * 30)}
        value = module.loss(outputs, torch.tensor([0, 1, 2, 3])).parts[name]
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^loss\.terms\.mlkd\.temperatures="):
        MLKD(temperatures=[])
    with pytest.raises(ConfigError, match=r"^loss\.terms\.mlkd\.temperatures=4\.0 must be a non-empty list"):
        MLKD(temperatures=4.0)
    with pytest.raises(ConfigError, match=r"^loss\.terms\.sdd\.scales=\[2, 4\]"):
        SDD(scales=[2, 4])
    with pytest.raises(ConfigError, match=r"^loss\.terms\.wkd_l: gamma=-1"):
        WKDL(gamma=-1)
    with pytest.raises(ConfigError, match=r"^loss\.terms\.wkd_l\.decay_end_epoch=100"):
        WKDL(decay_start_epoch=150, decay_end_epoch=100)
    with pytest.raises(ConfigError, match=r"^loss\.terms\.wkd_l\.teacher_head='fc' is not a module"):
        WKDL(teacher_head="fc").bind_models({"teacher": Headed(3, 4, 0)}, "loss.terms.wkd_l")
    with pytest.raises(ConfigError, match=r"^loss\.terms\.wkd_l reads the teacher's classifier"):
        WKDL()(torch.zeros(2, 3), torch.zeros(2, 3))
    assert TERMS["mlkd"] is MLKD and TERMS["sdd"] is SDD and TERMS["wkd_l"] is WKDL
