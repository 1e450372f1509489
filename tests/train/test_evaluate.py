"""The two validation protocols against a direct, one-window-at-a-time computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.evaluate import MIN_TILINGS, carried, evaluate, windowed
from train.model import CharRNN, ModelConfig
from train.protocol import shift_order

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=7, cell="lstm", num_layers=2, hidden_size=12)).eval()


def _window_loss(model, ids, start, window):
    """One window from the zero state: mean nats/char over its every position."""
    text = ids[start : start + window + 1][None]
    with torch.no_grad():
        logits, _ = model(text[:, :-1], model.init_state(1))
    return F.cross_entropy(logits[0], text[0, 1:]).item()


def test_windowed_reads_every_start_of_a_short_text_exactly(model):
    ids = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(1))
    mean, se, n, window, tilings = windowed(model, ids, CPU, seed=5, target_se=1e-12)
    # 44 possible starts, fewer than a window: 44 tilings of one window each; all read, the figure is exact
    assert (window, n, tilings, se) == (256, 300 - 256, 300 - 256, 0.0)
    direct = [_window_loss(model, ids, s, 256) for s in range(n)]
    assert mean == pytest.approx(sum(direct) / n, abs=1e-5)


def test_windowed_reads_seeded_tilings_until_the_standard_error_is_small(model):
    ids = torch.randint(0, 7, (4000,), generator=torch.Generator().manual_seed(2))
    window, target = 32, 0.0001  # far tighter than the default, so that more than MIN_TILINGS are needed
    mean, se, n, got_window, tilings = windowed(model, ids, CPU, seed=5, window=window, target_se=target)
    starts = len(ids) - window
    assert got_window == window and se <= target and MIN_TILINGS < tilings < window
    shifts = shift_order(window, 5)[:tilings]
    per_tiling = [[_window_loss(model, ids, s, window) for s in range(shift, starts, window)] for shift in shifts]
    assert n == sum(map(len, per_tiling))
    assert mean == pytest.approx(sum(map(sum, per_tiling)) / n, abs=1e-5)  # every window weighs the same
    tiling_means = torch.tensor([sum(t) / len(t) for t in per_tiling], dtype=torch.float64)
    fpc = math.sqrt((window - tilings) / (window - 1))  # shifts drawn without replacement from all of them
    assert se == pytest.approx(float(tiling_means.std()) / math.sqrt(tilings) * fpc, rel=1e-3)
    assert windowed(model, ids, CPU, seed=5, window=window, target_se=target) == (mean, se, n, window, tilings)


def test_carried_is_the_whole_text_in_streams_with_the_state_carried(model):
    ids = torch.randint(0, 7, (801,), generator=torch.Generator().manual_seed(3))
    loss = carried(model, ids, n_streams=4, seq_len=64, device=CPU)
    total = 0.0
    for row in range(4):  # each stream read in one call from the zero state == carried across windows
        text = ids[row * 200 : row * 200 + 201][None]
        with torch.no_grad():
            logits, _ = model(text[:, :-1], model.init_state(1))
        total += F.cross_entropy(logits[0], text[0, 1:], reduction="sum").item()
    assert loss == pytest.approx(total / 800, abs=1e-5)


def test_evaluate_restores_training_mode_and_leaves_the_global_rng_alone(model):
    ids = torch.randint(0, 7, (600,), generator=torch.Generator().manual_seed(4))
    model.train()
    before = torch.get_rng_state()
    ev = evaluate(model, ids, n_streams=8, seq_len=128, device=CPU, seed=1)
    assert model.training and torch.equal(torch.get_rng_state(), before)
    assert ev.carried_bpc == pytest.approx(ev.carried / math.log(2))
    assert ev.windowed_bpc == pytest.approx(ev.windowed / math.log(2))
    assert ev.record()["val_loss_windowed"] == ev.windowed and ev.seconds >= 0
    model.eval()
