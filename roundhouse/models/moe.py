"""Mixture-of-experts Transformer LM (SEEDS A19: a router plus n experts).

The notes give no gating formula, top-k or balancing loss, so this follows Switch Transformer
(top-1) and GShard (top-2):

- Router: a linear map to E logits per token; softmax probabilities `p`.
- Top-k: each token goes to its k most probable experts; the outputs are summed weighted by
  `p` (renormalized over the chosen k when k > 1).
- Capacity: an expert takes at most `ceil(capacity_factor * k * N / E)` of the N tokens of a
  batch. Assignments beyond it are dropped in priority order (every token's first choice
  before any second choice, then by position): the token skips that expert and the block's
  residual carries it through unchanged.
- Load-balancing loss (Switch): `E * sum_e f_e * P_e`, with `f_e` the fraction of tokens whose
  first choice is e and `P_e` the mean router probability of e; 1 when perfectly balanced.
- Router z-loss (ST-MoE): `mean(logsumexp(logits)^2)`, which keeps router logits small.

Each `MoELayer` stores `aux_loss = balance_coef * balance + z_coef * z`, `expert_counts` (tokens
assigned to each expert, before dropping) and `dropped_tokens` after its forward; the
`language_model` task adds the aux losses to the training loss and reports the counts (see
`roundhouse.trainer.tasks_lm`).

This is the native implementation for the single, ring and ps strategies: every expert lives
on every rank. Expert parallelism (DeepSpeed MoE) replaces `MoELayer`, not the model.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.common import is_tracing
from roundhouse.models.gpt import MLP, build_gpt, flavor_flops, gpt_layers, sequence_length
from roundhouse.models.registry import BuildConfig, ModelSpec, register
from roundhouse.models.spec import BYTE_VOCAB, TOKEN_INPUT

logger = logging.getLogger(__name__)


class Router(nn.Module):
    """Token -> expert logits `(N, E)`."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Router logits `(N, E)` in fp32 for tokens `(N, C)`."""
        return self.proj(x).float()  # (N, E); fp32 for a stable softmax and z-loss


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert: `ceil(factor * k * N / E)`."""
    return max(1, math.ceil(factor * top_k * num_tokens / num_experts))


def traced_capacity(tokens: Tensor, num_experts: int, top_k: int, factor: float) -> Tensor:
    """`capacity` as a tensor computed from `tokens` `(N, C)`, for traced graphs."""
    count = torch.ones_like(tokens[:, 0]).sum()  # N, as a graph value
    return (count * (factor * top_k / num_experts)).ceil().clamp(min=1)


def assign(probs: Tensor, top_k: int, slots: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Routes N tokens to experts and applies the capacity limit.

    Args:
        probs: `(N, E)` router probabilities.
        top_k: Experts per token.
        slots: Capacity per expert.

    Returns:
        `experts` `(N, k)` chosen expert ids, `weights` `(N, k)` combine weights (0 where the
        assignment was dropped), `kept` `(N, k)` bool.
    """
    top_p, experts = probs.topk(top_k, dim=-1)  # (N, k)
    weights = top_p / top_p.sum(dim=-1, keepdim=True) if top_k > 1 else top_p
    # Priority: all first choices (in token order), then all second choices.
    one_hot = F.one_hot(experts.T.reshape(-1), probs.shape[1])  # (k*N, E)
    position = (one_hot.cumsum(dim=0) - 1) * one_hot  # slot index within the chosen expert
    kept = (position.sum(dim=-1) < slots).view(top_k, -1).T  # (N, k)
    return experts, weights * kept, kept


def balance_loss(probs: Tensor, first_choice: Tensor) -> Tensor:
    """Switch's `E * sum_e f_e * P_e` (1.0 when tokens and probability spread evenly)."""
    num_experts = probs.shape[1]
    fraction = F.one_hot(first_choice, num_experts).float().mean(dim=0)  # f_e, (E,)
    return num_experts * (fraction * probs.mean(dim=0)).sum()


class MoELayer(nn.Module):
    """Router + `num_experts` MLPs in place of a block's MLP; `(B, T, C)` -> `(B, T, C)`.

    Args:
        dim: Width C.
        hidden: Each expert's MLP hidden width.
        num_experts: E.
        top_k: 1 (Switch) or 2 (GShard).
        capacity_factor: Slack over an even split; tokens beyond capacity are dropped.
        balance_coef: Weight of the load-balancing loss.
        z_coef: Weight of the router z-loss.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 4,
        top_k: int = 1,
        capacity_factor: float = 1.25,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts or capacity_factor <= 0:
            raise ModelError(
                f"moe: top_k={top_k}, num_experts={num_experts}, capacity={capacity_factor}",
                "use 1 <= top_k <= num_experts and capacity_factor > 0",
            )
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.router = Router(dim, num_experts)
        self.experts = nn.ModuleList(MLP(dim, hidden) for _ in range(num_experts))
        self.aux_loss: Tensor | None = None
        self.expert_counts: Tensor | None = None
        self.dropped_tokens: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Each token through its top-k experts, weighted by the router: `(B, T, C)` -> same."""
        tokens = x.reshape(-1, x.shape[-1])  # (N, C)
        logits = self.router(tokens)  # (N, E)
        probs = logits.softmax(dim=-1)
        if is_tracing():  # the slots of the exported input's token count, not the traced one's
            slots = traced_capacity(tokens, len(self.experts), self.top_k, self.capacity_factor)
        else:
            slots = capacity(tokens.shape[0], len(self.experts), self.top_k, self.capacity_factor)
        experts, weights, kept = assign(probs, self.top_k, slots)  # (N, k) each
        out = self.dispatch(tokens, experts, weights.to(x.dtype), kept)  # (N, C)
        self.record(logits, probs, experts, kept)
        return out.view_as(x)  # (B, T, C)

    def dispatch(self, tokens: Tensor, experts: Tensor, weights: Tensor, kept: Tensor) -> Tensor:
        """Runs each expert on its kept tokens and sums the weighted results per token."""
        out = torch.zeros_like(tokens)
        if tokens.is_meta:  # shape-only dry runs: which token goes where depends on values
            return out
        for e, expert in enumerate(self.experts):
            rows, choice = torch.nonzero((experts == e) & kept, as_tuple=True)
            # Training runs an expert with no tokens too: its zero gradient keeps every rank's
            # set of gradients the same (ZeRO-2's buckets; DeepSpeed's own MoE pads every
            # expert to capacity), and a trace keeps every expert's branch.
            if rows.numel() == 0 and not (torch.is_grad_enabled() or is_tracing()):
                continue
            result = expert(tokens[rows]) * weights[rows, choice].unsqueeze(-1)  # (n_e, C)
            out.index_add_(0, rows, result)
        return out

    def record(self, logits: Tensor, probs: Tensor, experts: Tensor, kept: Tensor) -> None:
        """Stores this forward's aux loss and routing statistics for the task to read."""
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        balance = balance_loss(probs, experts[:, 0])
        self.aux_loss = self.balance_coef * balance + self.z_coef * z_loss
        counts = F.one_hot(experts.reshape(-1), len(self.experts)).sum(dim=0)
        self.expert_counts = counts.detach().float()  # (E,)
        self.dropped_tokens = (~kept).sum().detach().float()


def build_moe_gpt(
    input_shape: tuple[int, ...],
    num_classes: int,
    dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    mlp_ratio: int = 4,
    num_experts: int = 4,
    top_k: int = 1,
    capacity_factor: float = 1.25,
    balance_coef: float = 0.01,
    z_coef: float = 0.001,
    moe_every: int = 1,
    positions: str = "rope",
    norm: str = "pre",
    dropout: float = 0.0,
) -> nn.Module:
    """A GPT whose every `moe_every`-th block (counting from the last) has an `MoELayer`.

    The other arguments are `build_gpt`'s. With `top_k=1` a token runs one expert of the same
    size as the dense MLP, so the active parameters per token equal the dense GPT's.
    """
    sequence_length("moe", input_shape)

    def make_ffn(index: int) -> nn.Module:
        if (num_layers - 1 - index) % moe_every:
            return MLP(dim, mlp_ratio * dim, dropout)
        return MoELayer(
            dim, mlp_ratio * dim, num_experts, top_k, capacity_factor, balance_coef, z_coef
        )

    return build_gpt(
        input_shape,
        num_classes,
        dim=dim,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        positions=positions,
        norm=norm,
        dropout=dropout,
        make_ffn=make_ffn,
    )


def moe_flops(config: BuildConfig) -> int:
    """Forward FLOPs per sequence, counting the k experts a token visits (router ignored)."""
    return flavor_flops(SPEC, config, active_ffn_key="top_k")


SPEC = register(
    ModelSpec(
        name="moe",
        flavors={
            "debug": {"dim": 64, "num_layers": 2, "num_heads": 4, "num_experts": 4},
            "small": {"dim": 384, "num_layers": 6, "num_heads": 6, "num_experts": 8},
            "small_top2": {
                "dim": 384,
                "num_layers": 6,
                "num_heads": 6,
                "num_experts": 8,
                "top_k": 2,
            },
        },
        builder=build_moe_gpt,
        description="MoE Transformer LM (router + experts, top-1/2, capacity, aux losses)",
        loss="language_model",
        pipeline_layers=gpt_layers,
        example_input=TOKEN_INPUT,
        example_classes=BYTE_VOCAB,
        flops_per_sample=moe_flops,
    )
)
