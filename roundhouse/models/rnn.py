"""RNN, GRU and LSTM (SEEDS A12): own cells, deep and bidirectional, as classifiers and byte LMs.

The cells are written out so the notes' gates are visible. Weights have `torch.nn.RNN/GRU/LSTM`'s
layout (`weight_ih` `(G*H, I)`, `weight_hh` `(G*H, H)`, `bias_ih`, `bias_hh`; gate order
GRU `r, z, n`, LSTM `i, f, g, o`), so the parity tests copy torch's weights in unchanged.

- RNN: `H_t = tanh(X_t W_ih + H_{t-1} W_hh + b)`; the same cell runs at every step and the
  initial memory is 0 (S3:1809-1827).
- GRU (S3:1859-1890): reset gate R and update gate Z are sigmoid FCs of `(X_t, H_{t-1})`;
  candidate `H~ = tanh(X_t W + (R * H_{t-1}) W + b)`; `H_t = Z * H_{t-1} + (1 - Z) * H~`
  (Z = 1 keeps the old state). `reset_after=True` (default, torch's and cuDNN's form) applies
  R after the recurrent matmul, `R * (H_{t-1} W + b)`; `False` is the notes' form, for which
  Z = 0 and R = 1 give a plain RNN (S3:1882).
- LSTM (S3:1892-1948): input, forget and output gates (sigmoid) and the candidate (tanh) are 4
  FCs of the input ("4 inputs, 1 output"); `C_t = F * C_{t-1} + I * C~` (forget = 0 flushes the
  memory) and `H_t = O * tanh(C_t)`, so H is in [-1, 1] while C is unbounded.

Deep: layer l's outputs are layer l+1's inputs. Bidirectional: a second cell reads the sequence
reversed and the two outputs are concatenated; it is for classification and feature extraction,
never forecasting (S3:1960-1976), so the language models refuse it. Gradient clipping
(`trainer.grad_clip_norm`) is the notes' fix for exploding gradients (S3:1847-1855).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.common import check_dropout
from roundhouse.models.gpt import sequence_length
from roundhouse.models.registry import ModelSpec, register
from roundhouse.models.spec import BYTE_VOCAB, TOKEN_INPUT

logger = logging.getLogger(__name__)

NUM_GATES = {"rnn": 1, "gru": 3, "lstm": 4}
State = tuple[Tensor, Tensor]  # (h, c); c is unused (zeros) for RNN/GRU


class RecurrentCell(nn.Module):
    """One direction of one layer: `step(x_proj_t, state) -> state`.

    Args:
        kind: `"rnn"`, `"gru"` or `"lstm"`.
        input_size: I.
        hidden_size: H.
        reset_after: GRU only; see the module docstring.
    """

    def __init__(self, kind: str, input_size: int, hidden_size: int, reset_after: bool = True):
        super().__init__()
        gates = NUM_GATES[kind]
        self.kind, self.hidden_size, self.reset_after = kind, hidden_size, reset_after
        self.weight_ih = nn.Parameter(torch.empty(gates * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(gates * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)  # torch's default init
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def project_inputs(self, x: Tensor) -> Tensor:
        """All steps' input FCs at once (no recurrence in them): `(B, T, I)` -> `(B, T, G*H)`."""
        return x @ self.weight_ih.T + self.bias_ih

    def step(self, xw: Tensor, state: State) -> State:
        """One time step from the projected input `xw` `(B, G*H)` and `(h, c)` `(B, H)`."""
        h, c = state
        if self.kind == "rnn":
            return torch.tanh(xw + h @ self.weight_hh.T + self.bias_hh), c
        if self.kind == "gru":
            return self.gru_step(xw, h), c
        return self.lstm_step(xw, h, c)

    def gru_step(self, xw: Tensor, h: Tensor) -> Tensor:
        """One GRU step: the next hidden state `(B, H)` from input and hidden projections."""
        x_r, x_z, x_n = xw.chunk(3, dim=-1)  # (B, H) each
        w_r, w_z, w_n = self.weight_hh.chunk(3, dim=0)
        b_r, b_z, b_n = self.bias_hh.chunk(3)
        reset = torch.sigmoid(x_r + h @ w_r.T + b_r)  # R
        update = torch.sigmoid(x_z + h @ w_z.T + b_z)  # Z
        if self.reset_after:
            candidate = torch.tanh(x_n + reset * (h @ w_n.T + b_n))
        else:
            candidate = torch.tanh(x_n + (reset * h) @ w_n.T + b_n)
        return update * h + (1 - update) * candidate  # Z=1 keeps the old state

    def lstm_step(self, xw: Tensor, h: Tensor, c: Tensor) -> State:
        """One LSTM step: the next `(hidden, cell)` from input and hidden projections."""
        gates = xw + h @ self.weight_hh.T + self.bias_hh  # (B, 4H): the 4 FCs
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # forget=0 flushes C
        h = torch.sigmoid(o) * torch.tanh(c)  # in [-1, 1]
        return h, c

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor:
        """Runs over `x` `(B, T, I)` from a zero state; returns all hidden states `(B, T, H)`."""
        xw = self.project_inputs(x)  # (B, T, G*H)
        zeros = x.new_zeros(x.shape[0], self.hidden_size)
        state: State = (zeros, zeros)
        outputs = []
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        for t in steps:
            state = self.step(xw[:, t], state)
            outputs.append(state[0])
        if reverse:
            outputs.reverse()
        return torch.stack(outputs, dim=1)  # (B, T, H)


class RecurrentStack(nn.Module):
    """`num_layers` layers of one or two directions; `(B, T, I)` -> `(B, T, D*H)`."""

    def __init__(
        self,
        kind: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        reset_after: bool = True,
    ) -> None:
        super().__init__()
        if kind not in NUM_GATES:
            raise ModelError(f"unknown cell {kind!r}", f"valid cells: {', '.join(NUM_GATES)}")
        directions = 2 if bidirectional else 1
        self.layers = nn.ModuleList()
        for layer in range(num_layers):
            size = input_size if layer == 0 else directions * hidden_size
            cells = [RecurrentCell(kind, size, hidden_size, reset_after) for _ in range(directions)]
            self.layers.append(nn.ModuleList(cells))
        self.drop = nn.Dropout(dropout)  # between layers, as torch.nn.LSTM's dropout

    def forward(self, x: Tensor) -> Tensor:
        """Hidden states `(B, T, H)` of the stacked (optionally bidirectional) layers."""
        for index, cells in enumerate(self.layers):
            if index > 0:
                x = self.drop(x)
            outs = [cell(x, reverse=d == 1) for d, cell in enumerate(cells)]  # (B, T, H) each
            x = torch.cat(outs, dim=-1)  # (B, T, D*H): directions concatenated
        return x


class RecurrentLM(nn.Module):
    """Byte-level LM: embedding -> unidirectional stack -> linear to logits `(B, T, V)`."""

    # Its cells loop over time steps in Python: a trace (ONNX export) unrolls them, so the
    # exported graph holds the traced sequence length (see `export/graph.py`).
    unrolled_in_time = True

    def __init__(self, vocab_size: int, stack: RecurrentStack, embed_dim: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = stack
        self.head = nn.Linear(hidden, vocab_size)  # the FC after H that produces Y (S3:1890)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits `(B, T, V)` of `tokens` `(B, T)`."""
        return self.head(self.rnn(self.embed(tokens)))  # (B, T) -> (B, T, H) -> (B, T, V)


class RecurrentClassifier(nn.Module):
    """Many-to-one (S2:378-388): the last step of each direction -> linear to `(B, K)`.

    Token inputs `(B, T)` are embedded; image inputs `(B, C, H, W)` are read row by row as a
    sequence of H steps of `C*W` features.
    """

    def __init__(self, stack: RecurrentStack, embed: nn.Module | None, hidden: int, classes: int):
        super().__init__()
        self.embed = embed
        self.rnn = stack
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits `(B, K)` of a sequence `x`."""
        if self.embed is not None:
            seq = self.embed(x)  # (B, T, E)
        else:
            seq = x.permute(0, 2, 1, 3).flatten(2)  # (B, C, H, W) -> (B, H, C*W)
        out = self.rnn(seq)  # (B, T, D*H)
        size = self.rnn.layers[-1][0].hidden_size
        # Forward direction: its last step; backward direction: its last step is t = 0.
        summary = torch.cat([out[:, -1, :size], out[:, 0, size:]], dim=-1)
        return self.head(summary)  # (B, K)


def build_rnn_lm(
    input_shape: tuple[int, ...],
    num_classes: int,
    cell: str = "lstm",
    embed_dim: int = 64,
    hidden_size: int = 128,
    num_layers: int = 1,
    dropout: float = 0.0,
    bidirectional: bool = False,
    reset_after: bool = True,
) -> RecurrentLM:
    """A byte-level RNN/GRU/LSTM language model for `(T,)` token inputs, vocabulary `num_classes`.

    Raises:
        ModelError: `bidirectional=True` (a forecaster must not see the future), a bad cell
            or a non-token input shape.
    """
    sequence_length(f"{cell}_lm", input_shape)
    if bidirectional:
        raise ModelError(
            "a bidirectional RNN cannot be a language model: it would read the next token",
            "use rnn_classifier for bidirectional models (S3:1960-1976)",
        )
    stack = RecurrentStack(
        cell, embed_dim, hidden_size, num_layers, False, check_dropout(dropout), reset_after
    )
    return RecurrentLM(num_classes, stack, embed_dim, hidden_size)


def build_rnn_classifier(
    input_shape: tuple[int, ...],
    num_classes: int,
    cell: str = "lstm",
    hidden_size: int = 64,
    num_layers: int = 1,
    bidirectional: bool = True,
    embed_dim: int = 32,
    vocab_size: int = 260,
    dropout: float = 0.0,
    reset_after: bool = True,
) -> RecurrentClassifier:
    """A sequence classifier for `(T,)` token inputs or `(C, H, W)` images (rows as steps)."""
    if len(input_shape) == 1:
        embed, features = nn.Embedding(vocab_size, embed_dim), embed_dim
    elif len(input_shape) == 3:
        embed, features = None, input_shape[0] * input_shape[2]
    else:
        raise ModelError(
            f"rnn_classifier takes (T,) tokens or (C, H, W) images, got {input_shape}", None
        )
    stack = RecurrentStack(
        cell, features, hidden_size, num_layers, bidirectional, check_dropout(dropout), reset_after
    )
    directions = 2 if bidirectional else 1
    return RecurrentClassifier(stack, embed, directions * hidden_size, num_classes)


def rnn_lm_layers(model: nn.Module) -> list[nn.Module]:
    """`[embed, rnn, head]`: the recurrence is one stage (its layers share a time loop)."""
    assert isinstance(model, RecurrentLM)
    return [model.embed, model.rnn, model.head]


for _cell in NUM_GATES:
    register(
        ModelSpec(
            name=f"{_cell}_lm",
            flavors={
                "debug": {"cell": _cell, "embed_dim": 32, "hidden_size": 64, "num_layers": 1},
                "small": {"cell": _cell, "embed_dim": 64, "hidden_size": 256, "num_layers": 2},
                "medium": {"cell": _cell, "embed_dim": 128, "hidden_size": 512, "num_layers": 2},
            },
            builder=build_rnn_lm,
            description=f"byte-level {_cell.upper()} language model (own cells, deep)",
            loss="language_model",
            pipeline_layers=rnn_lm_layers,
            example_input=TOKEN_INPUT,
            example_classes=BYTE_VOCAB,
        )
    )

register(
    ModelSpec(
        name="rnn_classifier",
        flavors={
            "debug": {"cell": "lstm", "hidden_size": 32, "bidirectional": True},
            "bilstm": {"cell": "lstm", "hidden_size": 128, "num_layers": 2},
            "bigru": {"cell": "gru", "hidden_size": 128, "num_layers": 2},
        },
        builder=build_rnn_classifier,
        description="many-to-one RNN/GRU/LSTM classifier (bidirectional; tokens or image rows)",
    )
)
