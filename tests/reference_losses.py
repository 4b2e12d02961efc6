"""Plain numpy re-implementations of the distillation formulas, written from the papers with explicit
loops; the library's vectorised torch terms are checked against them."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

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
