"""Plain numpy re-implementations of the distillation formulas, written from the papers with explicit
loops; the library's vectorised torch terms are checked against them. The last section transcribes authors'
torch code (cited per function) for the terms whose code defines them more exactly than the paper."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm

Array = np.ndarray


def softmax(row: Array) -> Array:
    e = np.exp(row - row.max())
    return e / e.sum()


def kl(p: Array, q: Array) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0))


def zscore(row: Array) -> Array:
    return (row - row.mean()) / (row.std(ddof=1) + 1e-7)


def kd(s: Array, t: Array, temperature: float, standardize: bool = False) -> float:
    prep = zscore if standardize else (lambda r: r)
    rows = [kl(softmax(prep(t[b]) / temperature), softmax(prep(s[b]) / temperature)) for b in range(len(s))]
    return temperature**2 * float(np.mean(rows))


def dkd(s: Array, t: Array, targets: list[int], alpha: float, beta: float, temperature: float) -> float:
    total = 0.0
    for b, y in enumerate(targets):
        ps, pt = softmax(s[b] / temperature), softmax(t[b] / temperature)
        tckd = kl(np.array([pt[y], 1 - pt[y]]), np.array([ps[y], 1 - ps[y]]))
        others = [c for c in range(s.shape[1]) if c != y]
        nckd = kl(softmax(t[b, others] / temperature), softmax(s[b, others] / temperature))
        total += alpha * tckd + beta * nckd
    return temperature**2 * total / len(targets)


def nkd(s: Array, t: Array, targets: list[int], gamma: float, temperature: float) -> float:
    """Yang et al. 2023: -p_t[y] log p_s[y] - gamma T^2 sum_{i != y} q_t[i] log q_s[i], q = softmax of the
    non-target logits at T."""
    total = 0.0
    for b, y in enumerate(targets):
        ps, pt = softmax(s[b]), softmax(t[b])
        others = [c for c in range(s.shape[1]) if c != y]
        qs, qt = softmax(s[b, others] / temperature), softmax(t[b, others] / temperature)
        total += -pt[y] * math.log(ps[y]) - gamma * temperature**2 * float(np.sum(qt * np.log(qs)))
    return total / len(targets)


def wttm(s: Array, t: Array, temperature: float) -> float:
    """Zheng & Yang 2024: mean_b (sum_i p_t[i]^(1/T)) KL(p_t^(1/T) / sum || softmax(z_s))."""
    total = 0.0
    for b in range(len(s)):
        powered = softmax(t[b]) ** (1.0 / temperature)
        total += float(powered.sum()) * kl(powered / powered.sum(), softmax(s[b]))
    return total / len(s)


def mlkd(s: Array, t: Array, temperatures: list[float]) -> float:
    """Jin et al. 2023 (the authors' code, one view for both): sum_T (1 + m) KD_T + c ||G^c_t - G^c_s||^2 / K
    + m ||G^b_t - G^b_s||^2 / B with class (K x K) and batch (B x B) Gram matrices of softmax(z / T); m, c: the
    fractions of samples / classes whose teacher confidence (T = 1) is <= the median. Code: github.com/Jin-Ying/
    Multi-Level-Logit-Distillation, mdistiller/distillers/KD_ours.py (transcribed in tests/test_mlkd_sdd_wkd.py)."""
    batch, classes = s.shape
    pt1 = np.array([softmax(row) for row in t])
    confidence, class_mass = pt1.max(axis=1), pt1.sum(axis=0)
    m = float(np.mean(confidence <= np.percentile(confidence, 50)))
    c = float(np.mean(class_mass <= np.percentile(class_mass, 50)))
    total = 0.0
    for temperature in temperatures:
        ps = np.array([softmax(row / temperature) for row in s])
        pt = np.array([softmax(row / temperature) for row in t])
        instance = temperature**2 * np.mean([kl(pt[b], ps[b]) for b in range(batch)])
        class_gram = sum(
            (pt[:, i] @ pt[:, j] - ps[:, i] @ ps[:, j]) ** 2 for i in range(classes) for j in range(classes)
        )
        batch_gram = sum((pt[a] @ pt[b] - ps[a] @ ps[b]) ** 2 for a in range(batch) for b in range(batch))
        total += (1 + m) * instance + c * class_gram / classes + m * batch_gram / batch
    return float(total)


def wkd_l(
    s: Array,
    t: Array,
    targets: list[int],
    head: Array,
    gamma: float,
    temperature: float,
    sharpen: float = 1.0,
    reg: float = 0.05,
    iterations: int = 10,
) -> float:
    """Lv et al. 2024: mean_b [-p_t[y] log p_s[y] + gamma sum_ij pi_ij C_ij], pi from Sinkhorn on the non-target
    softmaxes at T, C = 1 - exp(-sharpen (1 - cos(head_i, head_j))) + 1e-8 without class y. Code: github.com/
    JiamingLv/WKD, mdistiller/distillers/WKD.py (transcribed in tests/test_mlkd_sdd_wkd.py)."""
    unit_rows = head / np.linalg.norm(head, axis=1, keepdims=True)
    cost = np.maximum(1 - np.exp(-sharpen * (1 - unit_rows @ unit_rows.T)), 0) + 1e-8
    total = 0.0
    for b, y in enumerate(targets):
        others = [c for c in range(s.shape[1]) if c != y]
        p, q = softmax(s[b, others] / temperature), softmax(t[b, others] / temperature)
        kernel = np.exp(-cost[np.ix_(others, others)] / reg)
        u = np.full(len(others), 1.0 / len(others))
        for _ in range(iterations):
            v = q / (kernel.T @ u + 1e-8)
            u = p / (kernel @ v + 1e-8)
        plan = u[:, None] * kernel * v[None, :]
        transport = float(np.sum(plan * cost[np.ix_(others, others)]))
        total += -softmax(t[b])[y] * math.log(softmax(s[b])[y]) + gamma * transport
    return total / len(targets)


def pearson(u: Array, v: Array) -> float:
    return float(np.corrcoef(u, v)[0, 1])


def dist(s: Array, t: Array, beta: float, gamma: float, temperature: float) -> float:
    ys = np.stack([softmax(r / temperature) for r in s])
    yt = np.stack([softmax(r / temperature) for r in t])
    inter = np.mean([1 - pearson(ys[i], yt[i]) for i in range(len(ys))])
    intra = np.mean([1 - pearson(ys[:, j], yt[:, j]) for j in range(ys.shape[1])])
    return temperature**2 * float(beta * inter + gamma * intra)


def mse(s: Array, t: Array, beta: float) -> float:
    return beta * float(np.mean((s - t) ** 2))


def attention(s: Array, t: Array, beta: float) -> float:
    total = 0.0
    for b in range(len(s)):
        qs = (s[b] ** 2).mean(axis=0).ravel()
        qt = (t[b] ** 2).mean(axis=0).ravel()
        total += float(np.sum((qs / np.linalg.norm(qs) - qt / np.linalg.norm(qt)) ** 2)) / qs.size
    return beta / 2 * total / len(s)


def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd(s: Array, t: Array, distance_weight: float, angle_weight: float) -> float:
    def distances(e: Array) -> Array:
        n = len(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / d[~np.eye(n, dtype=bool)].mean()

    def angles(e: Array) -> Array:
        n = len(e)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i not in (j, k):
                        u, v = e[j] - e[i], e[k] - e[i]
                        out[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return out

    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    ds, dt = distances(s), distances(t)
    as_, at = angles(s), angles(t)
    distance = np.mean([huber(a, b) for a, b in zip(ds.ravel(), dt.ravel(), strict=True)])
    angle = np.mean([huber(a, b) for a, b in zip(as_.ravel(), at.ravel(), strict=True)])
    return float(distance_weight * distance + angle_weight * angle)


def sp(s: Array, t: Array, beta: float) -> float:
    def gram(e: Array) -> Array:
        g = e.reshape(len(e), -1) @ e.reshape(len(e), -1).T
        return np.stack([row / np.linalg.norm(row) for row in g])

    return beta * float(np.sum((gram(t) - gram(s)) ** 2)) / len(s) ** 2


def pkt(s: Array, t: Array, beta: float, eps: float = 1e-7) -> float:
    def conditional(e: Array) -> Array:
        e = e.reshape(len(e), -1)
        n = len(e)
        k = np.array(
            [
                [(1 + e[i] @ e[j] / (np.linalg.norm(e[i]) * np.linalg.norm(e[j]))) / 2 for j in range(n)]
                for i in range(n)
            ]
        )
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = conditional(s), conditional(t)
    return beta * float(np.mean(pt * np.log((pt + eps) / (ps + eps))))


def cc(s: Array, t: Array, beta: float, gamma: float, order: int) -> float:
    def correlation(e: Array) -> Array:
        e = e.reshape(len(e), -1)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        n = len(e)
        c = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                c[i, j] = sum(
                    math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * (e[i] @ e[j]) ** p
                    for p in range(order + 1)
                )
        return c

    return beta * float(np.mean((correlation(t) - correlation(s)) ** 2))


def vid(s: Array, t: Array, weights: list[Array], variance: Array, beta: float) -> float:
    """Vectors only: the mean regressor is ``W3 relu(W2 relu(W1 s))``."""
    total = 0.0
    for b in range(len(s)):
        h = s[b]
        for i, w in enumerate(weights):
            h = w @ h
            h = np.maximum(h, 0) if i < len(weights) - 1 else h
        total += sum(0.5 * math.log(v) + (t[b, c] - h[c]) ** 2 / (2 * v) for c, v in enumerate(variance))
    return beta * total / t.size


def numeric_gradient(fn: Callable[[Array], float], x: Array, h: float = 1e-6) -> Array:
    """Central finite differences of a numpy reference."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (fn(up) - fn(down)) / (2 * h)
    return grad


def unit(v: Array) -> Array:
    return v / np.sqrt(np.sum(v * v))


def nce(scores: list[list[float]], num_samples: int, eps: float = 1e-7) -> float:
    """Tian et al.'s NCE loss, sample by sample: log h(positive) + sum log (1 - h(noise))."""
    total = 0.0
    for row in scores:
        noise = (len(row) - 1) / num_samples
        total += math.log(row[0] / (row[0] + noise + eps))
        total += sum(math.log(noise / (p + noise + eps)) for p in row[1:])
    return -total / len(scores)


def crd(s: Array, t: Array, heads: dict[str, Array], banks: dict[str, Array], contrast: Array,
        z: dict[str, float], tau: float, beta: float) -> float:  # fmt: skip
    """CRD's two NCE terms: each side's embedding scored against the other side's memory bank."""
    num_samples = len(banks["student"])
    e_s = [unit(heads["ws"] @ s[b].ravel() + heads["bs"]) for b in range(len(s))]
    e_t = [unit(heads["wt"] @ t[b].ravel() + heads["bt"]) for b in range(len(t))]
    p_t = [
        [math.exp(float(banks["student"][j] @ e_t[b]) / tau) / z["teacher"] for j in contrast[b]] for b in range(len(t))
    ]
    p_s = [
        [math.exp(float(banks["teacher"][j] @ e_s[b]) / tau) / z["student"] for j in contrast[b]] for b in range(len(s))
    ]
    return beta * (nce(p_s, num_samples) + nce(p_t, num_samples))


def adaptive_pool(x: Array, size: int) -> Array:
    """Adaptive average pooling of the trailing 1 or 2 spatial axes to ``size`` bins each, with the
    bin edges floor(i * n / size) .. ceil((i + 1) * n / size)."""

    def edges(n: int, i: int) -> slice:
        return slice((i * n) // size, -((-(i + 1) * n) // size))

    if x.ndim == 3:
        return np.stack([x[:, :, edges(x.shape[2], i)].mean(axis=2) for i in range(size)], axis=2)
    rows = []
    for i in range(size):
        cols = [x[:, :, edges(x.shape[2], i), edges(x.shape[3], j)].mean(axis=(2, 3)) for j in range(size)]
        rows.append(np.stack(cols, axis=2))
    return np.stack(rows, axis=2)


def hcl(s: Array, t: Array, levels: tuple[int, ...] = (4, 2, 1)) -> float:
    """Chen et al.'s hierarchical context loss: full-size MSE plus pooled MSEs weighted 1/2, 1/4, ..."""
    loss, weight, total = float(np.mean((s - t) ** 2)), 1.0, 1.0
    for level in levels:
        if level >= s.shape[2]:
            continue
        weight /= 2
        loss += weight * float(np.mean((adaptive_pool(s, level) - adaptive_pool(t, level)) ** 2))
        total += weight
    return loss / total


# ------------------------------------------------------------------ authors' code, transcribed (torch)
Tensor = torch.Tensor


def ickd_authors(f_s: Tensor, f_t: Tensor, embed_weight: Tensor) -> Tensor:
    """ADLab-AutoDrive/ICKD, Cifar100/distiller_zoo/ICKD.py: ``Embed`` (1x1 conv, no bias, then a fresh
    BatchNorm2d in training mode) and ``ICKDLoss.batch_loss``, times the train script's ``-b 2.5`` left out."""
    f_s = F.conv2d(f_s, embed_weight)
    f_s = F.batch_norm(f_s, None, None, training=True)
    bsz, ch = f_s.shape[0], f_s.shape[1]
    f_s = f_s.view(bsz, ch, -1)
    f_t = f_t.view(bsz, ch, -1)
    emd_s = torch.bmm(f_s, f_s.permute(0, 2, 1))
    emd_s = torch.nn.functional.normalize(emd_s, dim=2)
    emd_t = torch.bmm(f_t, f_t.permute(0, 2, 1))
    emd_t = torch.nn.functional.normalize(emd_t, dim=2)
    g_diff = emd_s - emd_t
    return (g_diff * g_diff).view(bsz, -1).sum() / (ch * bsz)


def nst_authors(f_s: Tensor, f_t: Tensor) -> Tensor:
    """HobbitLong/RepDistiller, distiller_zoo/NST.py: ``NSTLoss.nst_loss`` with ``full_loss = True``."""

    def poly_kernel(a: Tensor, b: Tensor) -> Tensor:
        a = a.unsqueeze(1)
        b = b.unsqueeze(2)
        return (a * b).sum(-1).pow(2)

    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean() - 2 * poly_kernel(f_s, f_t).mean()


def srd_authors(feat_s: Tensor, feat_t: Tensor, logit_t: Tensor, conv_weight: Tensor, fc: torch.nn.Linear) -> Tensor:
    """jingyang2017/SRD_ossl, train_student.py (``transfer_conv``: 1x1 conv, BatchNorm2d, ReLU; ``statm_loss``) and
    helper/loops.py (``opt.distill == 'srd'``): ``statm_loss(f_s, f_t) + F.mse_loss(logit_tc, logit_t)`` with
    ``logit_tc`` the teacher's average pooling and ``fc`` on the connected student map."""
    f_s = F.relu(F.batch_norm(F.conv2d(feat_s, conv_weight), None, None, training=True))
    x = f_s.view(f_s.size(0), f_s.size(1), -1)
    y = feat_t.view(feat_t.size(0), feat_t.size(1), -1)
    statm = (x.mean(dim=2) - y.mean(dim=2)).pow(2).mean(1).mean()
    logit_tc = fc(F.adaptive_avg_pool2d(f_s, 1).flatten(1))
    return statm + F.mse_loss(logit_tc, logit_t)


def ofd_margin_authors(bn: torch.nn.BatchNorm2d) -> Tensor:
    """clovaai/overhaul-distillation, CIFAR-100/distiller.py: ``get_margin_from_BN``."""
    margin = []
    for s, m in zip(bn.weight.data, bn.bias.data, strict=True):
        s, m = abs(s.item()), m.item()
        if norm.cdf(-m / s) > 0.001:
            margin.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            margin.append(-3 * s)
    return torch.tensor(margin, dtype=torch.float64)


def ofd_authors(s_feats: list[Tensor], t_feats: list[Tensor], weights: list[Tensor], margins: list[Tensor]) -> Tensor:
    """clovaai/overhaul-distillation, CIFAR-100/distiller.py (``distillation_loss``, ``Distiller.forward``:
    connectors of a 1x1 conv and a fresh BatchNorm2d) and train_with_distillation.py's
    ``loss_distill.sum() / batch_size`` (its ``/ 1000`` is our beta)."""

    def distillation_loss(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
        target = torch.max(target, margin)
        loss = torch.nn.functional.mse_loss(source, target, reduction="none")
        loss = loss * ((source > target) | (target > 0)).float()
        return loss.sum()

    feat_num = len(t_feats)
    loss_distill = 0
    for i in range(feat_num):
        source = F.batch_norm(F.conv2d(s_feats[i], weights[i]), None, None, training=True)
        margin = margins[i].unsqueeze(1).unsqueeze(2).unsqueeze(0)
        loss_distill += distillation_loss(source, t_feats[i].detach(), margin) / 2 ** (feat_num - i - 1)
    return loss_distill / s_feats[0].shape[0]


def catkd_authors(stu: Tensor, tea: Tensor, w_s: Tensor, w_t: Tensor, resolution: int, normalize: bool) -> Tensor:
    """GzyAftermath/CAT-KD, mdistiller/distillers/CAT_KD.py (``CAT_loss``, ``_Normalize``) on the CAMs of
    mdistiller/models/cifar/resnet.py's ``ResNet_test``: ``conv_test``, a bias-free 1x1 conv with the classifier's
    weights, on the last map."""
    cam_s = F.conv2d(stu, w_s[:, :, None, None])
    cam_t = F.conv2d(tea, w_t[:, :, None, None])
    cam_s = F.adaptive_avg_pool2d(cam_s, (resolution, resolution))
    cam_t = F.adaptive_avg_pool2d(cam_t, (resolution, resolution))
    if normalize:
        cam_s, cam_t = F.normalize(cam_s, dim=(2, 3)), F.normalize(cam_t, dim=(2, 3))
    return F.mse_loss(cam_s, cam_t)


def wkd_f_authors(f_s: Tensor, f_t: Tensor, conv: torch.nn.Conv2d, ratio: float, eps: float = 1e-5) -> Tensor:
    """JiamingLv/WKD, mdistiller/distillers/WKD.py: ``wkd_feature_loss`` (grid 1) after ``ConvReg`` (1x1 conv
    with bias, a fresh BatchNorm2d, ReLU; mdistiller/distillers/_common.py), ``ratio * mean_loss + cov_loss``."""
    f_s = F.relu(F.batch_norm(conv(f_s), None, None, training=True))
    f_s_avg, f_t_avg = f_s.mean(dim=(-1, -2)), f_t.mean(dim=(-1, -2))
    f_s_std, f_t_std = torch.sqrt(f_s.var(dim=(-1, -2)) + eps), torch.sqrt(f_t.var(dim=(-1, -2)) + eps)
    mean_loss = F.mse_loss(f_s_avg, f_t_avg, reduction="sum") / f_s.size(0)
    cov_loss = F.mse_loss(f_s_std, f_t_std, reduction="sum") / f_s.size(0)
    return ratio * mean_loss + cov_loss
