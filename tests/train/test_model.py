import pytest
import torch

from train.model import CharRNN, ModelConfig


@pytest.mark.parametrize("cell,state_size", [("rnn", 16), ("gru", 16), ("lstm", 32)])
@pytest.mark.parametrize("input_kind", ["onehot", "embedding"])
def test_shapes(cell, state_size, input_kind):
    cfg = ModelConfig(vocab_size=11, cell=cell, num_layers=3, hidden_size=16, input=input_kind, embed_size=8)
    assert cfg.state_size == state_size
    model = CharRNN(cfg)
    logits, state = model(torch.randint(0, 11, (4, 7)), model.init_state(4))
    assert logits.shape == (4, 7, 11)
    assert state.shape == (4, 3, state_size)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_state_continuity_whole_sequence_equals_one_char_at_a_time(cell):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=9, cell=cell, num_layers=2, hidden_size=12)).eval()
    ids = torch.randint(0, 9, (3, 10))
    with torch.no_grad():
        whole, whole_state = model(ids, model.init_state(3))
        state, parts = model.init_state(3), []
        for t in range(10):
            logits, state = model(ids[:, t : t + 1], state)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, whole_state, atol=1e-5, rtol=0)


def test_rows_are_independent_streams():
    """Batch-first state: row b of the output depends on row b of the input and state only."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=9, cell="lstm", num_layers=2, hidden_size=12)).eval()
    ids = torch.randint(0, 9, (4, 5))
    state = torch.randn(4, 2, 24)
    with torch.no_grad():
        batched, batched_state = model(ids, state)
        alone, alone_state = model(ids[2:3], state[2:3])
    torch.testing.assert_close(batched[2:3], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched_state[2:3], alone_state, atol=1e-5, rtol=0)


def test_onehot_input_is_fixed():
    model = CharRNN(ModelConfig(vocab_size=5, cell="rnn", num_layers=1, hidden_size=5, input="onehot"))
    assert not any("onehot" in name for name, _ in model.named_parameters())
    assert "onehot" not in model.state_dict()  # rebuilt from the config, not stored


@pytest.mark.parametrize("bad", [dict(cell="transformer"), dict(input="bytes"), dict(hidden_size=0),
                                 dict(dropout=1.0)])
def test_bad_configs(bad):
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=5, **bad)
