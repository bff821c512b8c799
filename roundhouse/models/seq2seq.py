"""`seq2seq`: the encoder-decoder Transformer of "Attention Is All You Need" (SEEDS A15).

The encoder is a stack of bidirectional self-attention blocks over the source; the decoder a
stack of blocks of causal self-attention, cross-attention to the encoder's output (queries from
the decoder, keys and values from the encoder) and an MLP, each sub-layer with a residual and a
LayerNorm ("add & norm": post-LN by default, as in the paper; `norm: pre` is an option). Trained
with teacher forcing: the decoder reads the target shifted right (`BOS y1 .. yn`) and predicts
it (`y1 .. yn EOS`) at every position in parallel.

Positions: `"sinusoidal"` (the paper's fixed `sin/cos` table added to the embeddings, default)
or `"rope"` (rotary, in the self-attention of both stacks; cross-attention has no positions of
its own). Tokens are the data's vocabulary (bytes, or word pieces whose ids extend the bytes';
either way `PAD`/`BOS`/`EOS` are the byte tokenizer's ids); one embedding is shared by source,
target and the output map (`tie_weights`), as in the paper. `PAD` in the source is masked out
of every attention over it.

Decoding: `greedy` (argmax each step) and `beam_search` (keep the `beam` best prefixes by
summed log-probability, a finished hypothesis scored by its length-normalised log-probability).
Both re-run the decoder over the whole prefix each step, which is exactly `decode_step`, the
graph the ONNX export traces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.data.text import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from roundhouse.errors import ModelError
from roundhouse.models.attention import MultiHeadAttention
from roundhouse.models.common import check_dropout
from roundhouse.models.gpt import MLP, TransformerBlock, init_transformer, sequence_length
from roundhouse.models.registry import BuildConfig, ModelSpec, register
from roundhouse.models.spec import BYTE_VOCAB, TOKEN_INPUT

POSITIONS = ("sinusoidal", "rope")


def sinusoidal_table(num_positions: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The paper's `PE[p, 2i] = sin(p / 10000^(2i/d))`, `PE[p, 2i+1] = cos(...)`: `(P, C)`.

    Computed per call (a few thousand sin/cos), not kept as a buffer: no strategy then has to
    know that a state-dict entry is not a weight, and any length works.
    """
    positions = torch.arange(num_positions, dtype=torch.float32, device=device)[:, None]
    steps = torch.arange(0, dim, 2, dtype=torch.float32, device=device)
    angles = positions * torch.exp(steps * (-math.log(10000.0) / dim))  # (P, C/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[:, :dim]


class Embedding(nn.Module):
    """Token embedding scaled by `sqrt(C)`, plus the sinusoidal table (unless RoPE)."""

    def __init__(self, vocab_size: int, dim: int, sinusoidal: bool, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.scale = math.sqrt(dim)
        self.sinusoidal = sinusoidal
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """`(B, T)` ids -> `(B, T, C)`."""
        x = self.tok(tokens) * self.scale
        if self.sinusoidal:
            x = x + sinusoidal_table(tokens.shape[1], x.shape[-1], x.device).to(x.dtype)
        return self.drop(x)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder's output, MLP; add & norm each."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: int, norm: str, rope: bool, dropout: float
    ) -> None:
        super().__init__()
        self.norm = norm
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout=dropout, rope=rope)
        self.cross_attn = MultiHeadAttention(dim, num_heads, dropout=dropout)
        self.ffn = MLP(dim, mlp_ratio * dim, dropout)
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_padding: Tensor | None) -> Tensor:
        """`x` `(B, T, C)` attending to itself (causally) and to `memory` `(B, S, C)`."""
        sublayers = (
            lambda h: self.drop(self.self_attn(h, causal=True)),
            lambda h: self.drop(
                self.cross_attn(h, context=memory, key_padding_mask=memory_padding)
            ),
            self.ffn,
        )
        for norm, sublayer in zip((self.ln1, self.ln2, self.ln3), sublayers, strict=True):
            x = x + sublayer(norm(x)) if self.norm == "pre" else norm(x + sublayer(x))
        return x


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer: `(B, S)` source and `(B, T)` target-in -> `(B, T, V)`."""

    def __init__(
        self,
        embed: Embedding,
        encoder: list[nn.Module],
        decoder: list[DecoderBlock],
        norm: str,
        vocab_size: int,
    ) -> None:
        super().__init__()
        dim = embed.tok.embedding_dim
        self.embed = embed
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)
        final = (lambda: nn.LayerNorm(dim)) if norm == "pre" else nn.Identity
        self.enc_norm, self.dec_norm = final(), final()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's `(B, S, C)` output and the source's padding mask `(B, S)`."""
        padding = src == PAD_ID
        x = self.embed(src)
        for block in self.encoder:
            x = block(x, key_padding_mask=padding)
        return self.enc_norm(x), padding

    def decode(self, tgt: Tensor, memory: Tensor, padding: Tensor) -> Tensor:
        """Next-token logits `(B, T, V)` of the target prefix `tgt` `(B, T)`."""
        x = self.embed(tgt)
        for block in self.decoder:
            x = block(x, memory, padding)
        return self.proj(self.dec_norm(x))

    def forward(self, src: Tensor, tgt: Tensor | None = None) -> Tensor:
        """Teacher forcing: logits `(B, T, V)` of the shifted-right target `tgt` (default the
        `BOS` column alone: the first token's logits, `(B, 1, V)`)."""
        if tgt is None:
            tgt = torch.full((src.shape[0], 1), BOS_ID, dtype=torch.long, device=src.device)
        memory, padding = self.encode(src)
        return self.decode(tgt, memory, padding)

    def decode_step(self, tgt: Tensor, memory: Tensor, padding: Tensor) -> Tensor:
        """`(B, V)` logits of the token after the prefix `tgt` (the exported decoder step)."""
        return self.decode(tgt, memory, padding)[:, -1]

    @torch.no_grad()
    def greedy(self, src: Tensor, max_len: int) -> Tensor:
        """`(B, <= max_len)` argmax continuations of `BOS` (ending at `EOS`, then `PAD`)."""
        memory, padding = self.encode(src)
        tokens = torch.full((src.shape[0], 1), BOS_ID, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self.decode_step(tokens, memory, padding).argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == EOS_ID
            if bool(done.all()):
                break
        return tokens[:, 1:]

    @torch.no_grad()
    def beam_search(
        self, src: Tensor, max_len: int, beam: int = 4, length_penalty: float = 1.0
    ) -> Tensor:
        """The best of `beam` hypotheses for one source `(1, S)` -> `(L,)` ids (EOS included).

        A finished hypothesis scores `logp / len ** length_penalty`; `beam=1` is greedy.
        """
        if beam < 1:
            raise ModelError(f"beam width must be >= 1, got {beam}", "pass --beam 1 or more")
        memory, padding = self.encode(src)
        alive = [(0.0, [BOS_ID])]
        finished: list[tuple[float, list[int]]] = []
        for _ in range(max_len):
            prefixes = torch.tensor([ids for _, ids in alive], device=src.device)
            n = prefixes.shape[0]
            logp = F.log_softmax(
                self.decode_step(prefixes, memory.expand(n, -1, -1), padding.expand(n, -1)), -1
            )
            top = logp.topk(beam, dim=-1)
            grown = [
                (score + float(v), [*ids, int(i)])
                for (score, ids), vals, idx in zip(alive, top.values, top.indices, strict=True)
                for v, i in zip(vals, idx, strict=True)
            ]
            grown.sort(key=lambda h: -h[0])
            alive = []
            for score, ids in grown:
                if ids[-1] == EOS_ID:
                    finished.append((score / (len(ids) - 1) ** length_penalty, ids))
                elif len(alive) < beam:
                    alive.append((score, ids))
            if not alive or (
                len(finished) >= beam and best_so_far(finished, alive, length_penalty)
            ):
                break
        if not finished:  # nothing ended within max_len: the best unfinished prefix
            finished = [(s / (len(ids) - 1) ** length_penalty, ids) for s, ids in alive]
        best = max(finished, key=lambda h: h[0])[1]
        return torch.tensor(best[1:], dtype=torch.long)


def best_so_far(
    finished: list[tuple[float, list[int]]],
    alive: list[tuple[float, list[int]]],
    length_penalty: float,
) -> bool:
    """Whether the best finished hypothesis scores at least what every live one scores at its
    current length (Hugging Face's beam-search stopping heuristic; a live one only loses
    log-probability as it grows, though its length penalty can still lift it). Stopping as
    soon as `beam` hypotheses had finished returned a short one while the greedy, better one
    was still growing (seen on an AMD EPYC host, where the toy model's numbers differ)."""
    done = max(score for score, _ in finished)
    return all(done >= score / (len(ids) - 1) ** length_penalty for score, ids in alive)


def build_seq2seq(
    input_shape: tuple[int, ...],
    num_classes: int,
    vocab_size: int = VOCAB_SIZE,
    dim: int = 64,
    num_layers: int = 2,
    num_decoder_layers: int | None = None,
    num_heads: int = 4,
    mlp_ratio: int = 4,
    positions: str = "sinusoidal",
    norm: str = "post",
    dropout: float = 0.0,
    tie_weights: bool = True,
) -> Seq2Seq:
    """An encoder-decoder Transformer for `(S,)` sources over a token vocabulary.

    Args:
        input_shape: `(S,)`, the source length.
        num_classes: The output vocabulary (the data's; equal to `vocab_size` for text).
        vocab_size: The token vocabulary of source and target.
        dim, num_heads, mlp_ratio: Width, heads, MLP ratio of every block.
        num_layers: Encoder blocks; `num_decoder_layers` decoder blocks (default the same).
        positions: `"sinusoidal"` or `"rope"`.
        norm: `"post"` (the paper's add & norm) or `"pre"`.
        dropout: Embedding, attention and residual dropout.
        tie_weights: One embedding for source, target and the output map.
    """
    sequence_length("seq2seq", input_shape)
    if positions not in POSITIONS or norm not in ("pre", "post"):
        raise ModelError(
            f"seq2seq: bad positions={positions!r} or norm={norm!r}",
            f"positions is one of {POSITIONS}, norm 'pre' or 'post'",
        )
    dropout = check_dropout(dropout)
    vocab = max(vocab_size, num_classes)
    rope = positions == "rope"
    encoder = [
        TransformerBlock(
            dim, num_heads, MLP(dim, mlp_ratio * dim, dropout), norm=norm, causal=False,
            rope=rope, dropout=dropout,
        )
        for _ in range(num_layers)
    ]  # fmt: skip
    decoder = [
        DecoderBlock(dim, num_heads, mlp_ratio, norm, rope, dropout)
        for _ in range(num_decoder_layers or num_layers)
    ]
    model = Seq2Seq(Embedding(vocab, dim, not rope, dropout), encoder, decoder, norm, vocab)
    init_transformer(model, num_layers)
    if tie_weights:
        model.proj.weight = model.embed.tok.weight
    return model


def seq2seq_flops(config: BuildConfig) -> int:
    """Forward FLOPs of one pair (source and target of the source's length)."""
    kwargs = {**SPEC.flavors[config.flavor], **config.options}
    dim, layers = kwargs.get("dim", 64), kwargs.get("num_layers", 2)
    seq = sequence_length("seq2seq", config.input_shape)
    ratio = kwargs.get("mlp_ratio", 4)
    block = 4 * dim * dim + 2 * ratio * dim * dim + 2 * seq * dim
    per_token = layers * block + layers * (block + 4 * dim * dim + 2 * seq * dim)
    return 2 * seq * (per_token + dim * config.num_classes)


SPEC = register(
    ModelSpec(
        name="seq2seq",
        flavors={
            "debug": {"dim": 32, "num_layers": 1, "num_heads": 2},
            "tiny": {"dim": 128, "num_layers": 2, "num_heads": 4},
            "small": {"dim": 256, "num_layers": 4, "num_heads": 4},
            "base": {"dim": 512, "num_layers": 6, "num_heads": 8},  # the paper's base model
        },
        builder=build_seq2seq,
        description="encoder-decoder Transformer (cross-attention, teacher forcing, beam search)",
        loss="seq2seq",
        flops_per_sample=seq2seq_flops,
        example_input=TOKEN_INPUT,
        example_classes=BYTE_VOCAB,
    )
)
