"""Pure, vectorised sampling: a function of logits, per-row parameters and per-row generators.

Every row is independent: its result depends only on its own logits, parameters and generator, so
batching streams together never changes what any of them samples (the masks below are exact per
row, whichever other rows share the call). Each row draws exactly one uniform number from its
generator per character, whatever its parameters, so a seeded stream's draws depend on its seed alone.

The sampler is inverse-CDF in vocabulary order over the tempered distribution restricted to the
top_k most likely tokens (all tokens tied with the k-th are kept) and then to the top_p nucleus
(the most likely tokens whose probability, before each, sums to less than top_p).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64 (the model's distribution at temperature 1)."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    out: np.ndarray = x - (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))
    return out


def draw(generators: Sequence[np.random.Generator]) -> np.ndarray:
    """One uniform [0, 1) number per row, each from that row's own generator."""
    return np.fromiter((g.random() for g in generators), dtype=np.float64, count=len(generators))


class RowParams:
    """Per-row sampling parameters with what the sampler can precompute (built once per batch).

    temperature: 0 = greedy (the most likely token, lowest id on ties); top_k: 0 or >= vocab = off;
    top_p: in (0, 1], 1 = off.
    """

    def __init__(self, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                 alternatives: np.ndarray | None = None) -> None:
        self.greedy = np.asarray(temperature) == 0
        self.any_greedy = bool(self.greedy.any())
        t = np.where(self.greedy, 1.0, temperature).astype(np.float64)
        self.tempered = bool((t != 1.0).any())
        self.inv_temperature = (1.0 / t)[:, None]
        self.top_k = np.asarray(top_k, dtype=np.int64)
        self.top_p = np.asarray(top_p, dtype=np.float64)
        self.rows = np.arange(len(t))
        # Which filters any row uses, decided once per batch rather than on every character.
        self.use_p = self.top_p < 1.0
        self.any_p = bool(self.use_p.any())
        self._k_for: dict[int, tuple[np.ndarray, np.ndarray, bool]] = {}
        # Rows that want their top alternatives reported (OpenAI's logprobs), and how many at most.
        wanted = np.zeros(len(t), dtype=np.int64) if alternatives is None else np.asarray(alternatives, np.int64)
        self.alternative_rows = np.flatnonzero(wanted)
        self.alternatives = wanted

    def top_k_rows(self, vocab: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(rows that filter by top_k, their k-1 index (0 elsewhere), any) for this vocabulary size."""
        cached = self._k_for.get(vocab)
        if cached is None:
            use = (self.top_k > 0) & (self.top_k < vocab)
            cached = self._k_for[vocab] = (use, np.where(use, self.top_k - 1, 0), bool(use.any()))
        return cached

    def __len__(self) -> int:
        return len(self.rows)


def sample(logits: np.ndarray, params: RowParams, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One token per row of logits [n, V], with uniforms [n] in [0, 1) from `draw`.

    Returns token ids [n] (int64) and their log-probabilities under the untempered model [n].
    """
    vocab = logits.shape[1]
    use_k, kth_index, any_k = params.top_k_rows(vocab)
    if len(logits) == 1 and not any_k and not params.any_p:
        return _sample_one(logits, params, uniforms)
    x = logits.astype(np.float64)
    shifted = np.subtract(x, x.max(axis=1, keepdims=True), out=x)
    e = np.exp(shifted)
    total = e.sum(axis=1)
    p = np.exp(shifted * params.inv_temperature) if params.tempered else e
    if any_k:
        kth = -np.sort(-p, axis=1)[params.rows, kth_index]
        p = np.where(use_k[:, None] & (p < kth[:, None]), 0.0, p)
    if params.any_p:
        order = np.argsort(-p, axis=1, kind="stable")
        ranked = np.take_along_axis(p, order, axis=1)
        before = (np.cumsum(ranked, axis=1) - ranked) / ranked.sum(axis=1, keepdims=True)
        drop = np.empty_like(before, dtype=bool)
        np.put_along_axis(drop, order, before >= params.top_p[:, None], axis=1)
        p = np.where(params.use_p[:, None] & drop, 0.0, p)
    cdf = np.cumsum(p, axis=1)
    mass = cdf[:, -1]
    target = np.minimum(uniforms * mass, np.nextafter(mass, 0.0))  # strictly below the total mass
    tokens = (cdf <= target[:, None]).sum(axis=1)  # first token whose cdf exceeds target: p > 0
    if params.any_greedy:
        tokens = np.where(params.greedy, logits.argmax(axis=1), tokens)
    # log-probabilities of the chosen tokens only: the other V-1 are never looked at
    return tokens, shifted[params.rows, tokens] - np.log(total)


def _sample_one(logits: np.ndarray, params: RowParams, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sample` for one row without top_k/top_p (one stream's every step): the same arithmetic on the
    row as a vector, so the same bits, in about half the time (numpy's per-call cost dominates a
    65-wide row, and a 2-D reduction costs twice a 1-D one)."""
    x = logits[0].astype(np.float64)
    shifted = np.subtract(x, x.max(), out=x)
    e = np.exp(shifted)
    total = e.sum()
    p = np.exp(shifted * params.inv_temperature[0]) if params.tempered else e
    cdf = np.cumsum(p)
    mass = cdf[-1]
    target = min(uniforms[0] * mass, np.nextafter(mass, 0.0))
    # cdf is non-decreasing: the count of entries <= target is where target would go on its right
    token = int(np.searchsorted(cdf, target, side="right"))
    if params.any_greedy:
        token = int(logits[0].argmax())
    return np.array([token]), np.array([shifted[token] - np.log(total)])


def logprobs(logits: np.ndarray) -> np.ndarray:
    """Every token's log-probability at temperature 1 for each row of logits [m, V], computed as `sample`
    computes the drawn token's, so that the two agree to the bit."""
    x = logits.astype(np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1))[:, None]
    return out


def top_logprobs(logits: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n most likely tokens of each row of logits [m, V] (most likely first, lowest id on ties) and their
    log-probabilities (`logprobs`)."""
    logp = logprobs(logits)
    top = np.argsort(-logp, axis=1, kind="stable")[:, :min(n, logits.shape[1])]
    return top, np.take_along_axis(logp, top, axis=1)


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
