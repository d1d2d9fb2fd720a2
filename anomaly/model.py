"""The LSTM forecaster: one network for a whole fleet, each device with its own (h, c).

Why it exists: a reading is judged in the context of its device's history. The network predicts
each device's next reading from the readings so far; the detector keeps every device's hidden
state between calls, so the model is advanced step by step for many devices at once. The model
works on *scaled* readings (see :class:`~anomaly.bundle.Scaler`); it knows nothing of devices,
slots or Kafka.

Shapes (legend used throughout the package): B devices in the batch, T steps, F features,
L layers, H hidden size. Inputs and outputs are batch-first ``[B, T, F]``, but h and c are
``[L, B, H]`` — as in :class:`torch.nn.LSTM`, ``batch_first`` does not apply to the state.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["LSTMForecaster"]

logger = logging.getLogger(__name__)


class LSTMForecaster(nn.Module):
    """Predict each next reading of a multivariate series from the readings so far.

    The prediction for step t+1 is ``x_t + head(h_t)``: the network learns a correction to
    persistence, which keeps it stable on series whose level wanders. Context inputs (commands,
    setpoints, modes) are extra input columns after the F features: the LSTM sees them at every step,
    but they are never forecast (the output has F columns only). A context value at step t informs the
    forecast of step t+1 onwards.

    Parameters
    ----------
    n_features : int
        F, the number of sensor features (at least 1).
    hidden_size : int
        H, the LSTM's hidden size.
    num_layers : int
        L, stacked LSTM layers.
    dropout : float
        Dropout between stacked layers (training only; ignored when ``num_layers == 1``).
    n_context : int
        Fc, the number of context inputs (0: none).

    Inputs: x, (h_0, c_0), lengths
        - x: ``[B, T, F + Fc]`` scaled readings, features first, then context.
        - h_0, c_0: ``[L, B, H]``, or ``None`` for zeros.
        - lengths: optional ``[B]`` int64 tensor, the number of valid steps of each row (1..T);
          padded steps beyond a row's length do not touch its state.

    Outputs: predictions, (h_n, c_n)
        - predictions: ``[B, T, F]``, ``predictions[:, t]`` is the forecast of ``x[:, t + 1]``
          (garbage at padded steps).
        - h_n, c_n: ``[L, B, H]``, the state after each row's last valid step.

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> m = LSTMForecaster(n_features=3, hidden_size=8)
    >>> pred, (h, c) = m(torch.zeros(5, 4, 3))
    >>> tuple(pred.shape), tuple(h.shape)
    ((5, 4, 3), (1, 5, 8))
    """

    def __init__(self, n_features: int, hidden_size: int = 64, num_layers: int = 1, dropout: float = 0.0,
                 n_context: int = 0):
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if n_context < 0:
            raise ValueError(f"n_context must be >= 0, got {n_context}")
        self.n_features = n_features
        self.n_context = n_context
        self.n_inputs = n_features + n_context
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.lstm = nn.LSTM(self.n_inputs, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(hidden_size, n_features)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c), each ``[L, batch, H]``."""
        shape = (self.num_layers, batch, self.hidden_size)
        return torch.zeros(shape), torch.zeros(shape)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if x.dim() != 3 or x.shape[2] != self.n_inputs:
            raise ValueError(f"expected input [B, T, {self.n_inputs}], got {list(x.shape)}")
        if state is not None:
            h0, c0 = state
            want = (self.num_layers, x.shape[0], self.hidden_size)
            if tuple(h0.shape) != want or tuple(c0.shape) != want:
                raise ValueError(f"expected hidden state of size {list(want)}, got {list(h0.shape)}")
        if lengths is None or bool((lengths == x.shape[1]).all()):
            out, (hn, cn) = self.lstm(x, state)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out_packed, (hn, cn) = self.lstm(packed, state)
            out, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=x.shape[1])
        return x[..., :self.n_features] + self.head(out), (hn, cn)
