"""GPT: a decoder-only Transformer language model (SEEDS A15, A17).

Tokens `(B, T)` -> embeddings -> blocks of masked (causal) self-attention and a per-position MLP
-> LayerNorm -> a linear map to vocabulary logits `(B, T, V)`, trained with next-token
cross-entropy on all positions in parallel (the shifted-right targets; S3:2174-2182).

Choices, each an option:
- `positions`: `"rope"` (default; rotary, extrapolates) or `"learned"` (an added table of
  `max_len` rows, as in GPT-2; it does not extrapolate, S3:1632-1636).
- `norm`: `"pre"` (default; `x + f(LN(x))`, stable at depth) or `"post"` (`LN(x + f(x))`, the
  "add & norm" the notes and the original Transformer describe, S3:2079).
- `tie_weights`: the output map reuses the token embedding matrix (default on).

The `TransformerBlock` here is shared with BERT (non-causal) and the MoE model (whose MLP is
a mixture of experts). `generate` decodes greedily (or samples with a temperature and top-k)
with a per-layer KV cache; `use_cache=False` re-runs the whole prefix each step, which tests
compare against.

Flavor names follow GPT-2/GPT-3 sizes (`124m`, `350m`, `1.3b` are their layouts); with the
byte vocabulary (260) the embedding is tiny, so the actual counts are lower than the names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.attention import KVCache, MultiHeadAttention
from roundhouse.models.common import check_dropout
from roundhouse.models.registry import BuildConfig, ModelSpec, register
from roundhouse.models.spec import BYTE_VOCAB, TOKEN_INPUT

logger = logging.getLogger(__name__)

POSITIONS = ("rope", "learned")
NORMS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh")  # exact erf GELU (BERT) or the tanh approximation (GPT-2)


def build_activation(activation: str) -> nn.Module:
    """`nn.GELU` for `"gelu"` (erf) or `"gelu_tanh"` (the approximation GPT-2 uses)."""
    if activation not in ACTIVATIONS:
        raise ModelError(f"bad activation={activation!r}", f"valid: {', '.join(ACTIVATIONS)}")
    return nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")


class MLP(nn.Module):
    """Per-position feed-forward: `Linear(C, 4C) -> GELU -> Linear(4C, C)` (S3:1527)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        dropout: float = 0.0,
        bias: bool = True,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = build_activation(activation)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """The position-wise MLP of a Transformer block: `(B, T, C)` -> `(B, T, C)`."""
        return self.drop(self.fc2(self.act(self.fc1(x))))  # (B, T, C)


class TransformerBlock(nn.Module):
    """Self-attention and an MLP, each with a residual and a LayerNorm (pre- or post-LN).

    Args:
        dim: Width C (kept: no layer changes the shape of its input, S3:2061).
        num_heads: Attention heads.
        ffn: The per-position network (an `MLP`, or an MoE layer).
        norm: `"pre"` or `"post"`.
        causal: Decoder (masked) self-attention.
        rope: Rotary positions inside attention.
        dropout: Residual and attention dropout.
        norm_eps: The LayerNorms' epsilon (BERT checkpoints use 1e-12).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: nn.Module,
        *,
        norm: str = "pre",
        causal: bool = True,
        rope: bool = True,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm, self.causal = norm, causal
        self.ln1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads, dropout=dropout, rope=rope)
        self.ln2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, cache: KVCache | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        # x: (B, T, C)
        """Attention then MLP, each with a residual, over `x` `(B, T, C)` (cache: decoding)."""

        def attend(h: Tensor) -> Tensor:
            out = self.attn(h, causal=self.causal, cache=cache, key_padding_mask=key_padding_mask)
            return self.drop(out)

        if self.norm == "pre":
            x = x + attend(self.ln1(x))
            return x + self.ffn(self.ln2(x))  # (B, T, C)
        x = self.ln1(x + attend(x))
        return self.ln2(x + self.ffn(x))


class TokenEmbedding(nn.Module):
    """Token embedding plus, with learned positions, an added position table.

    `norm_eps` adds a LayerNorm over the sum (BERT's embedding LayerNorm); None has none.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_len: int,
        learned: bool,
        dropout: float,
        norm_eps: float | None = None,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim) if learned else None
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm_eps is not None else None
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        """Token plus position embeddings `(B, T, C)`; positions start at `offset` (decoding)."""
        x = self.tok(tokens)  # (B, T, C)
        if self.pos is not None:
            length = offset + tokens.shape[1]
            if length > self.pos.num_embeddings:
                raise ModelError(
                    f"{length} positions exceed the learned table's {self.pos.num_embeddings}",
                    "use positions='rope' (extrapolates) or a larger max_len",
                )
            x = x + self.pos(torch.arange(offset, length, device=tokens.device))
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


class LMHead(nn.Module):
    """Final LayerNorm (pre-LN only; post-LN outputs are already normalized) and logits."""

    def __init__(self, dim: int, vocab_size: int, final_norm: bool, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if final_norm else nn.Identity()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Token logits `(B, T, V)` from final states `(B, T, C)`."""
        return self.proj(self.norm(x))  # (B, T, V)


class GPT(nn.Module):
    """`embed -> blocks -> head`: `(B, T)` token ids to `(B, T, V)` next-token logits."""

    def __init__(self, embed: TokenEmbedding, blocks: list[nn.Module], head: LMHead) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, tokens: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """Next-token logits `(B, T, V)` of `tokens` `(B, T)` (caches: incremental decoding)."""
        offset = 0 if caches is None else caches[0].length
        x = self.embed(tokens, offset)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(x)  # (B, T, V)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        use_cache: bool = True,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Appends `max_new_tokens` tokens: greedy (argmax) by default, or sampled.

        Args:
            prompt: `(B, T0)` token ids.
            max_new_tokens: Tokens to add.
            use_cache: Feed only the newest token and reuse cached keys/values; False re-runs
                the whole sequence every step (same tokens, quadratic cost).
            temperature: 0 decodes greedily; > 0 samples from `softmax(logits / temperature)`
                (sampling instead of argmax, S3:5).
            top_k: With sampling, keep only the k most likely tokens.
            generator: Seeds the sampling.

        Returns:
            `(B, T0 + max_new_tokens)`.
        """
        tokens = prompt
        caches = [KVCache() for _ in self.blocks] if use_cache else None
        step_input = prompt
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else tokens, caches)  # (B, t, V)
            next_token = pick_next_token(logits[:, -1], temperature, top_k, generator)  # (B, 1)
            tokens = torch.cat([tokens, next_token], dim=1)
            step_input = next_token
        return tokens


def pick_next_token(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`(B, V)` last-position logits -> `(B, 1)` ids: argmax, or a temperature/top-k sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def sequence_length(model_name: str, input_shape: tuple[int, ...]) -> int:
    """T of a `(T,)` token input; raises `ModelError` for image shapes."""
    if len(input_shape) != 1:
        raise ModelError(
            f"model {model_name!r} needs token sequences of shape (T,), got {input_shape}",
            "use a text source such as builtin:pytext",
        )
    return int(input_shape[0])


def check_positions(model_name: str, seq_len: int, max_len: int | None, positions: str) -> None:
    """Raises `ModelError` when the data's sequences are longer than a learned position table."""
    if positions == "learned" and max_len is not None and seq_len > max_len:
        raise ModelError(
            f"{model_name}: {seq_len} positions exceed the learned table's {max_len} "
            "(the data's sequences are longer than the model's position table)",
            f"set data.options.seq_len <= {max_len}",
        )


def check_choices(model_name: str, positions: str, norm: str) -> None:
    """Raises `ModelError` for an unknown `positions` or `norm` option."""
    if positions not in POSITIONS or norm not in NORMS:
        raise ModelError(
            f"{model_name}: bad positions={positions!r} or norm={norm!r}",
            f"positions is one of {POSITIONS}, norm one of {NORMS}",
        )


def init_transformer(model: nn.Module, num_layers: int) -> nn.Module:
    """GPT-2 init: N(0, 0.02) weights, and residual output maps scaled by 1/sqrt(2 * layers).

    The scaling keeps the residual stream's variance from growing with depth.
    """
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / (2 * num_layers) ** 0.5 if name.endswith(("out_proj", "fc2")) else 0.02
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def build_gpt(
    input_shape: tuple[int, ...],
    num_classes: int,
    dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    mlp_ratio: int = 4,
    positions: str = "rope",
    norm: str = "pre",
    tie_weights: bool = True,
    dropout: float = 0.0,
    max_len: int | None = None,
    make_ffn: Callable[[int], nn.Module] | None = None,
    activation: str = "gelu",
    norm_eps: float = 1e-5,
) -> GPT:
    """Builds a GPT for `(T,)` token inputs and a vocabulary of `num_classes`.

    Args:
        input_shape: `(T,)`, the training sequence length.
        num_classes: Vocabulary size V.
        dim: Width C.
        num_layers: Number of blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width / C.
        positions: `"rope"` or `"learned"`.
        norm: `"pre"` or `"post"` LayerNorm placement.
        tie_weights: Share the token embedding with the output map.
        dropout: Embedding, attention and residual dropout.
        max_len: Rows of the learned position table (default T); unused with RoPE.
        make_ffn: Builds block i's feed-forward network (the MoE model passes its experts);
            default an `MLP`.
        activation: The MLP's `"gelu"` (erf) or `"gelu_tanh"` (GPT-2's approximation).
        norm_eps: Every LayerNorm's epsilon.
    """
    seq_len = sequence_length("gpt", input_shape)
    check_choices("gpt", positions, norm)
    check_positions("gpt", seq_len, max_len, positions)
    dropout = check_dropout(dropout)
    build_activation(activation)  # rejects an unknown name before anything is built
    make_ffn = make_ffn or (lambda _i: MLP(dim, mlp_ratio * dim, dropout, activation=activation))
    embed = TokenEmbedding(num_classes, dim, max_len or seq_len, positions == "learned", dropout)
    blocks = [
        TransformerBlock(
            dim,
            num_heads,
            make_ffn(i),
            norm=norm,
            causal=True,
            rope=positions == "rope",
            dropout=dropout,
            norm_eps=norm_eps,
        )
        for i in range(num_layers)
    ]
    model = GPT(embed, blocks, LMHead(dim, num_classes, norm == "pre", norm_eps))
    init_transformer(model, num_layers)
    if tie_weights:
        model.head.proj.weight = model.embed.tok.weight  # (V, C) used both ways
    return model


def transformer_flops(
    seq_len: int, vocab: int, dim: int, num_layers: int, mlp_ratio: int = 4, active_ffn: int = 1
) -> int:
    """Forward FLOPs of one sequence: 2 x multiply-adds of every matmul.

    Per token and layer: q/k/v/out maps `4 C^2`, MLP `2 * mlp_ratio * C^2` (times the experts
    a token visits), attention scores and weighted sum `2 * T * C` (no causal discount, as in
    the PaLM MFU formula); plus the vocabulary projection `C * V`.
    """
    per_layer = 4 * dim * dim + active_ffn * 2 * mlp_ratio * dim * dim + 2 * seq_len * dim
    return 2 * seq_len * (num_layers * per_layer + dim * vocab)


def flavor_flops(spec: ModelSpec, config: BuildConfig, active_ffn_key: str | None = None) -> int:
    """`transformer_flops` for a registered transformer's flavor (plus options) at `config`.

    `active_ffn_key` names the option that counts the FFNs a token visits (MoE's `top_k`).
    """
    kwargs = {**spec.flavors[config.flavor], **config.options}
    return transformer_flops(
        sequence_length(spec.name, config.input_shape),
        config.num_classes,
        kwargs.get("dim", 64),
        kwargs.get("num_layers", 2),
        kwargs.get("mlp_ratio", 4),
        active_ffn=kwargs.get(active_ffn_key, 1) if active_ffn_key else 1,
    )


def gpt_flops(config: BuildConfig) -> int:
    """`flops_per_sample` for the registry: the flavor's layout at `config`'s sequence length."""
    return flavor_flops(SPEC, config)


def gpt_layers(model: nn.Module) -> list[nn.Module]:
    """`[embed, *blocks, head]`, whose sequential application is `model.forward`.

    With `tie_weights` the first and last entries share a weight; a pipeline must keep them
    tied (DeepSpeed's `TiedLayerSpec`).
    """
    assert isinstance(model, GPT)
    return [model.embed, *model.blocks, model.head]


SPEC = register(
    ModelSpec(
        name="gpt",
        flavors={
            "debug": {"dim": 64, "num_layers": 2, "num_heads": 4},
            "tiny": {"dim": 128, "num_layers": 4, "num_heads": 4},  # ~0.8M: the 2-core config
            "small": {"dim": 384, "num_layers": 6, "num_heads": 6},
            "124m": {"dim": 768, "num_layers": 12, "num_heads": 12},
            "350m": {"dim": 1024, "num_layers": 24, "num_heads": 16},
            "1.3b": {"dim": 2048, "num_layers": 24, "num_heads": 16},
        },
        builder=build_gpt,
        description="decoder-only Transformer LM (causal SDPA, RoPE/learned positions, tied)",
        loss="language_model",
        pipeline_layers=gpt_layers,
        flops_per_sample=gpt_flops,
        example_input=TOKEN_INPUT,
        example_classes=BYTE_VOCAB,
    )
)
