"""RNN/GRU/LSTM cells and stacks against torch.nn.RNN/GRU/LSTM, and the notes' gate facts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from roundhouse import models
from roundhouse.errors import ModelError
from roundhouse.models.rnn import RecurrentCell, RecurrentStack

TORCH_RNNS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def copy_torch_weights(ours: RecurrentStack, ref: nn.RNNBase) -> None:
    """torch names its weights `weight_ih_l{layer}{_reverse}`; ours are per cell."""
    with torch.no_grad():
        for layer, cells in enumerate(ours.layers):
            for direction, cell in enumerate(cells):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(cell, name).copy_(getattr(ref, name + suffix))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, True)])
def test_stack_matches_torch_with_copied_weights(kind: str, layers: int, bidirectional: bool):
    torch.manual_seed(0)
    ref = TORCH_RNNS[kind](5, 8, num_layers=layers, bidirectional=bidirectional, batch_first=True)
    ours = RecurrentStack(kind, 5, 8, num_layers=layers, bidirectional=bidirectional)
    copy_torch_weights(ours, ref)
    x = torch.randn(3, 7, 5)
    expected, _ = ref(x)
    got = ours(x)
    assert got.shape == (3, 7, 8 * (2 if bidirectional else 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Gradients flow the same way too.
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(
        ours.layers[0][0].weight_hh.grad, ref.weight_hh_l0.grad, atol=1e-4, rtol=1e-4
    )


def test_gru_notes_form_with_z0_r1_is_a_plain_rnn() -> None:
    """SEEDS A12 (S3:1882): with Z = 0 and R = 1 the GRU is a plain RNN."""
    torch.manual_seed(0)
    gru = RecurrentCell("gru", 4, 6, reset_after=False)
    rnn = RecurrentCell("rnn", 4, 6)
    big = 50.0  # sigmoid(+50) = 1 (R), sigmoid(-50) = 0 (Z)
    with torch.no_grad():
        for cell in (gru, rnn):
            cell.bias_ih.zero_()
        gru.weight_ih[:12].zero_()
        gru.weight_hh[:12].zero_()
        gru.bias_hh[:6].fill_(big)
        gru.bias_hh[6:12].fill_(-big)
        gru.weight_ih[12:].copy_(rnn.weight_ih)
        gru.weight_hh[12:].copy_(rnn.weight_hh)
        gru.bias_hh[12:].copy_(rnn.bias_hh)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(gru(x), rnn(x))


def test_lstm_forget_gate_zero_flushes_memory_and_h_is_bounded() -> None:
    """SEEDS A12 (S3:1902, 1936)."""
    cell = RecurrentCell("lstm", 3, 4)
    with torch.no_grad():
        cell.bias_hh[4:8].fill_(-100.0)  # forget gate pre-activation -> sigmoid = 0
    xw = cell.project_inputs(torch.randn(2, 3))
    h, c = cell.step(xw, (torch.zeros(2, 4), torch.full((2, 4), 1e3)))
    assert c.abs().max() < 2  # the old memory (1000) is gone
    assert h.abs().max() <= 1


def test_language_models_refuse_bidirectional() -> None:
    config = models.BuildConfig(input_shape=(16,), num_classes=260, options={"bidirectional": True})
    with pytest.raises(ModelError, match="bidirectional"):
        models.get("lstm_lm").build(config)


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (12,)])
def test_classifier_reads_images_by_row_and_token_sequences(input_shape) -> None:
    torch.manual_seed(0)
    config = models.BuildConfig(input_shape=input_shape, num_classes=10)
    model = models.get("rnn_classifier").build(config)
    x = torch.rand(4, *input_shape) if len(input_shape) == 3 else torch.randint(0, 256, (4, 12))
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
