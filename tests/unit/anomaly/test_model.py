"""LSTMForecaster: shapes, per-row lengths, and the boundary checks."""

import pytest
import torch

from anomaly.model import LSTMForecaster


def test_predicts_next_step_for_each_row_from_its_own_state():
    torch.manual_seed(0)
    model = LSTMForecaster(3, hidden_size=8, num_layers=2)
    x = torch.randn(4, 6, 3)
    full, (h, c) = model(x)
    assert full.shape == (4, 6, 3) and h.shape == (2, 4, 8)
    # two calls of 3 steps carrying the state equal one call of 6 steps
    first, state = model(x[:, :3])
    second, (h2, c2) = model(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), full)
    torch.testing.assert_close(h2, h)
    torch.testing.assert_close(c2, c)


def test_lengths_leave_padded_steps_out_of_the_state():
    torch.manual_seed(0)
    model = LSTMForecaster(2, hidden_size=5)
    x = torch.randn(3, 4, 2)
    lengths = torch.tensor([4, 1, 2])
    _, (h, _) = model(x, None, lengths)
    for row, n in enumerate(lengths.tolist()):
        _, (h_row, _) = model(x[row:row + 1, :n])
        torch.testing.assert_close(h[:, row], h_row[:, 0])


def test_untrained_model_is_persistence():
    model = LSTMForecaster(2, hidden_size=4)
    x = torch.randn(1, 5, 2)
    pred, _ = model(x)
    torch.testing.assert_close(pred, x)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_features": 0}, "n_features"), ({"n_features": 2, "hidden_size": 0}, "hidden_size"),
    ({"n_features": 2, "num_layers": 0}, "num_layers"), ({"n_features": 2, "dropout": 1.5}, "dropout"),
])
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LSTMForecaster(**kwargs)


def test_rejects_wrong_input_and_state_shapes():
    model = LSTMForecaster(3, hidden_size=4)
    with pytest.raises(ValueError, match=r"expected input \[B, T, 3\]"):
        model(torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="expected hidden state of size"):
        model(torch.zeros(2, 5, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))
