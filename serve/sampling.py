"""Pure, vectorised sampling: a function of logits, per-row parameters and per-row generators.

Every row is independent: its result depends only on its own logits, parameters and generator, so
batching streams together never changes what any of them samples. Each row draws exactly one
uniform number from its generator per call, whatever its parameters, so a seeded stream's sequence
of draws is fixed by its seed alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64 (the model's distribution at temperature 1)."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))


def draw(generators: Sequence[np.random.Generator]) -> np.ndarray:
    """One uniform [0, 1) number per row, each from that row's own generator."""
    return np.fromiter((g.random() for g in generators), dtype=np.float64, count=len(generators))


def sample(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
           uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chooses one token per row by inverse-CDF sampling over the truncated, tempered distribution.

    logits [n, V]; temperature [n] (0 = greedy: the most likely token, lowest id on ties); top_k [n]
    (0 or >= V = off); top_p [n] in (0, 1] (1 = off); uniforms [n] in [0, 1).
    Returns token ids [n] (int64) and their log-probabilities under the untempered model [n].
    """
    n, vocab = logits.shape
    logp = log_softmax(logits)
    greedy = temperature == 0
    tempered = logp / np.where(greedy, 1.0, temperature)[:, None]
    order = np.argsort(-tempered, axis=1, kind="stable")  # most likely first, lowest id on ties
    z = np.take_along_axis(tempered, order, axis=1)
    p = np.exp(z - z[:, :1])
    rank = np.arange(vocab)
    k = np.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    p[rank[None, :] >= k[:, None]] = 0.0
    p /= p.sum(axis=1, keepdims=True)
    mass_before = np.cumsum(p, axis=1) - p
    p[mass_before >= top_p[:, None]] = 0.0  # rank 0 always stays: its mass_before is 0 < top_p
    cdf = np.cumsum(p, axis=1)
    target = uniforms * cdf[:, -1]
    idx = (cdf <= target[:, None]).sum(axis=1)
    kept = (p > 0).sum(axis=1)  # the kept tokens are a prefix of the sorted order
    idx = np.minimum(idx, kept - 1)
    idx[greedy] = 0
    tokens = order[np.arange(n), idx]
    return tokens.astype(np.int64), logp[np.arange(n), tokens]


def most_likely(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For Predict/Step: per row the argmax token and its probability, and the top_k candidates.

    logits [T, V]. Returns next ids [T], next probabilities [T], top ids [T, k], top probabilities
    [T, k] with k = min(top_k, V), most likely first, lowest id on ties.
    """
    probs = np.exp(log_softmax(logits))
    order = np.argsort(-probs, axis=1, kind="stable")
    k = min(max(top_k, 0), probs.shape[1])
    top = order[:, :k]
    best = order[:, 0]
    rows = np.arange(probs.shape[0])
    return best, probs[rows, best], top, np.take_along_axis(probs, top, axis=1)
