"""Pure sampling: greedy, truncation, seeding, and row independence (why batching cannot change text)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serve.engine import sampling

finite = st.floats(min_value=-30, max_value=30, allow_nan=False, width=32)


def params(n: int, temperature=1.0, top_k=0, top_p=1.0) -> sampling.RowParams:
    return sampling.RowParams(np.full(n, temperature, dtype=np.float64), np.full(n, top_k, dtype=np.int64),
                              np.full(n, top_p, dtype=np.float64))


def test_greedy_takes_the_argmax_and_lowest_id_on_ties():
    logits = np.array([[0.0, 2.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    tokens, logprobs = sampling.sample(logits, params(2, temperature=0.0), np.array([0.99, 0.5]))
    assert tokens.tolist() == [1, 0]
    np.testing.assert_allclose(logprobs, sampling.log_softmax(logits)[[0, 1], [1, 0]])


def test_inverse_cdf_walks_the_vocabulary_in_order():
    logits = np.log(np.array([[0.1, 0.6, 0.3]]))
    pick = lambda u, **kw: sampling.sample(logits, params(1, **kw), np.array([u]))[0][0]
    assert [pick(u) for u in (0.0, 0.09, 0.11, 0.69, 0.71, 0.999999)] == [0, 0, 1, 1, 2, 2]
    assert [pick(u, top_k=2) for u in (0.0, 0.66, 0.67, 0.999999)] == [1, 1, 2, 2]
    assert [pick(u, top_p=0.5) for u in (0.0, 0.999999)] == [1, 1]
    assert [pick(u, top_p=0.7) for u in (0.0, 0.66, 0.67, 0.999999)] == [1, 1, 2, 2]


def test_top_k_keeps_ties_with_the_kth():
    logits = np.log(np.array([[0.3, 0.3, 0.3, 0.1]]))
    tokens = {sampling.sample(logits, params(1, top_k=1), np.array([u]))[0][0] for u in (0.0, 0.5, 0.99)}
    assert tokens == {0, 1, 2}


def test_frequencies_follow_the_tempered_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.2]] * 20000))
    tokens, _ = sampling.sample(logits, params(20000, temperature=1.0), rng.random(20000))
    np.testing.assert_allclose(np.bincount(tokens, minlength=3) / 20000, [0.5, 0.3, 0.2], atol=0.015)
    tokens, _ = sampling.sample(logits, params(20000, temperature=0.5), rng.random(20000))
    expected = np.array([0.5, 0.3, 0.2]) ** 2 / (np.array([0.5, 0.3, 0.2]) ** 2).sum()
    np.testing.assert_allclose(np.bincount(tokens, minlength=3) / 20000, expected, atol=0.015)


def test_draw_uses_each_rows_own_generator():
    a = sampling.draw([np.random.default_rng(1), np.random.default_rng(2)])
    b = sampling.draw([np.random.default_rng(2)])
    assert a[1] == b[0] and a[0] != a[1]


def test_most_likely_orders_candidates():
    logits = np.log(np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]]))
    best, prob, top, top_prob = sampling.most_likely(logits, 5)
    assert best.tolist() == [1, 0] and top.tolist() == [[1, 2, 0], [0, 2, 1]]
    np.testing.assert_allclose(prob, [0.6, 0.4])
    np.testing.assert_allclose(top_prob[0], [0.6, 0.3, 0.1])
    assert sampling.most_likely(logits, 0)[2].shape == (2, 0)


rows = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.tuples(
        hnp.arrays(np.float32, (n, 7), elements=finite),
        st.lists(st.sampled_from([0.0, 0.3, 1.0, 2.5]), min_size=n, max_size=n),
        st.lists(st.integers(min_value=0, max_value=9), min_size=n, max_size=n),
        st.lists(st.sampled_from([1e-3, 0.5, 0.9, 1.0]), min_size=n, max_size=n),
        st.lists(st.floats(min_value=0, max_value=1, exclude_max=True), min_size=n, max_size=n),
    ))


@settings(max_examples=300, deadline=None)
@given(rows)
def test_samples_are_valid_and_rows_are_independent(case):
    logits, temperature, top_k, top_p, uniforms = case
    args = (np.array(temperature), np.array(top_k), np.array(top_p))
    u = np.array(uniforms)
    tokens, logprobs = sampling.sample(logits, sampling.RowParams(*args), u)
    logp = sampling.log_softmax(logits)
    for i in range(len(logits)):
        # alone == in the batch
        alone, alone_lp = sampling.sample(logits[i:i + 1], sampling.RowParams(*(a[i:i + 1] for a in args)),
                                          u[i:i + 1])
        assert alone[0] == tokens[i] and alone_lp[0] == logprobs[i]
        np.testing.assert_allclose(logprobs[i], logp[i, tokens[i]], rtol=1e-12, atol=1e-12)
        assert np.exp(logp[i, tokens[i]]) > 0
        order = np.argsort(-logp[i], kind="stable")
        rank = int(np.nonzero(order == tokens[i])[0][0])
        if temperature[i] == 0:
            assert tokens[i] == np.argmax(logits[i])
        if top_k[i] > 0:  # ties with the k-th are kept
            assert logp[i, tokens[i]] >= np.sort(logp[i])[::-1][min(top_k[i], 7) - 1]
        if top_p[i] < 1 and temperature[i] == 1.0:
            mass_before = np.exp(logp[i][order[:rank]]).sum()
            assert rank == 0 or mass_before < top_p[i] + 1e-9
