"""Expert parallel for the DeepSpeed strategy: native `MoELayer`s become DeepSpeed `MoE` layers.

`apply_deepspeed_moe(model, ep_size)` replaces every `roundhouse.models.moe.MoELayer` in place by
a `DeepSpeedMoELayer`, a wrapper around `deepspeed.moe.layer.MoE` (GShard-style all-to-all
dispatch). Of the E experts of a layer, ep rank r holds `E / ep_size` local experts, the global
experts `r * local + i` (DeepSpeed's placement); their initial weights, and the router's, are
copied from the native layer, so a run starts from the weights `single` starts from.

Routing follows the native layer: top-k over a linear router's softmax, capacity
`ceil(capacity_factor * k * N / E)` tokens per expert on each rank's N tokens (at least 1;
DeepSpeed computes `ceil(N / E * capacity_factor * k)`), first choices before second choices,
dropped assignments pass through the block's residual. Deviations from the native layer:
DeepSpeed picks which over-capacity tokens to drop by its own order (`use_rts=False`: no random
token selection, no RNG draws), and the second top-2 choice is the plain argmax (no Gumbel
sampling), as natively.

Attribute contract of `roundhouse.trainer.tasks_lm` (read after every forward):
`aux_loss = balance_coef * l_aux + z_coef * z_loss`, with DeepSpeed's `l_aux` (Switch's
`E * sum_e f_e * P_e`, the native balance loss) and the router z-loss recomputed here from the
gate's weight (DeepSpeed has none); `expert_counts` `(E,)` float tokens this rank routed to each
expert before dropping (DeepSpeed's `exp_counts`); `dropped_tokens` the assignments dropped.

Evaluation. `EvalLoader` ranks may run different numbers of batches, so an eval forward must not
be collective. Switching the layer to eval mode (`train(False)`, which the strategy's
`train_mode(False)` does on every rank at the same point) all-gathers the experts over the ep
group into a plain native `MoELayer` replica, used for eval forwards without communication and
freed by `train(True)`. Eval metrics are therefore the native layer's on the same weights; the
replica costs every expert's memory on every rank for the length of an evaluation.

Checkpoints. `ExpertParallelHook.consolidate` maps the wrapper's parameter names back to the
native model's (`<layer>.router.proj.weight`, `<layer>.experts.<global id>.<...>`) and
all-gathers every rank's local experts (weights and optimizer state) over the ep group, so a
checkpoint holds what `single` saves; `partition` keeps this rank's experts at load.
`merge_expert_groups` saves DeepSpeed's dense + expert optimizer groups (and the LR scheduler's
per-group lists) as the one group they were split from, so `single` loads them too;
`widen_groups` spreads one saved group over the live groups at load.

Training micro-batches must hold the same token count on every rank (the all-to-all exchanges
equal-sized buffers): `deepspeed_config.check_experts` rejects a partial last batch. ZeRO-3 does
not run DeepSpeed's native MoE. Imports deepspeed lazily.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.models.moe import MoELayer

logger = logging.getLogger(__name__)

GATE = "moe.deepspeed_moe.gate.wg.weight"  # the router, inside the wrapper
LOCAL_EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts."  # + "<local id>.<param>"
EXPERT_NAME = re.compile(r"(^|\.)experts\.\d+\.")  # canonical: "<layer>.experts.<id>.<param>"
GROUP_KEYS = ("name", "moe")  # keys DeepSpeed adds to the optimizer groups it splits


def is_expert_name(name: str) -> bool:
    """Whether `name` (a canonical, native-model parameter name) belongs to an expert."""
    return EXPERT_NAME.search(name) is not None


def expert_group(ep_size: int) -> tuple[Any, int]:
    """This rank's expert-parallel process group and its rank in it.

    Creates DeepSpeed's expert and expert-data-parallel groups (consecutive ranks form an ep
    group) when they do not exist yet; the engine then reuses them.
    """
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name), groups._get_expert_parallel_rank(name)


class DeepSpeedMoELayer(nn.Module):
    """A native `MoELayer`'s replacement holding this rank's experts in a DeepSpeed `MoE`.

    Args:
        native: The layer replaced (its router and experts give the initial weights; it is
            kept on the meta device as the template of the eval replica).
        ep_size: Expert-parallel size (divides the layer's expert count).
        ep_group: The expert-parallel process group of this rank.
        ep_rank: This rank's index in `ep_group`.
    """

    def __init__(self, native: MoELayer, ep_size: int, ep_group: Any, ep_rank: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        dim = native.router.proj.in_features
        self.num_experts = len(native.experts)
        self.local = self.num_experts // ep_size
        self.first = ep_rank * self.local  # global id of local expert 0
        self.balance_coef, self.z_coef = native.balance_coef, native.z_coef
        self.ep_group, self.ep_size = ep_group, ep_size
        self.moe = MoE(
            hidden_size=dim,
            expert=copy.deepcopy(native.experts[0]),
            num_experts=self.num_experts,
            ep_size=ep_size,
            k=native.top_k,
            capacity_factor=native.capacity_factor,
            eval_capacity_factor=native.capacity_factor,
            min_capacity=1,
            drop_tokens=True,
            use_residual=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        ).to(native.router.proj.weight.device)
        self.copy_from(native)
        self.moe.deepspeed_moe.gate.register_forward_hook(self._count_dropped)
        # Not registered as submodules: invisible to named_parameters() and the optimizer.
        self._template = [native.to("meta")]
        self._replica: list[MoELayer] = []
        self.train_counts: Tensor | None = None  # (E,) since the last `take_train_counts`
        self.train_dropped: Tensor | None = None
        self.aux_loss: Tensor | None = None
        self.expert_counts: Tensor | None = None
        self.dropped_tokens: Tensor | None = None

    @property
    def local_experts(self) -> nn.ModuleList:
        """The experts held on this rank."""
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    @property
    def gate_weight(self) -> nn.Parameter:
        """The router's weight (shared by every rank)."""
        return self.moe.deepspeed_moe.gate.wg.weight

    @torch.no_grad()
    def copy_from(self, native: MoELayer) -> None:
        """Router and this rank's experts from the native layer."""
        self.gate_weight.copy_(native.router.proj.weight)
        for i, expert in enumerate(self.local_experts):
            expert.load_state_dict(native.experts[self.first + i].state_dict())

    # --- forward ----------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """`(B, T, C)` -> `(B, T, C)`; sets `aux_loss`, `expert_counts`, `dropped_tokens`."""
        if not self.training and self._replica:
            return self._eval_forward(x)
        out, l_aux, counts = self.moe(x)
        z_loss = self._z_loss(x) if self.z_coef else torch.zeros((), device=x.device)
        self.aux_loss = self.balance_coef * l_aux + self.z_coef * z_loss
        self.expert_counts = counts.detach().float()
        if self.training and torch.is_grad_enabled():
            self._accumulate(self.expert_counts, self.dropped_tokens)
        return out

    def _z_loss(self, x: Tensor) -> Tensor:
        """ST-MoE's `mean(logsumexp(logits)^2)` of the router logits (fp32, as natively)."""
        tokens = x.reshape(-1, x.shape[-1]).float()
        logits = F.linear(tokens, self.gate_weight.float())  # (N, E)
        return torch.logsumexp(logits, dim=-1).square().mean()

    def _count_dropped(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        """Gate hook: routes DeepSpeed evicted over capacity carry expert index -1."""
        indices = output[3] if isinstance(output, tuple) and len(output) == 7 else None
        if torch.is_tensor(indices) and indices.dtype in (torch.int32, torch.int64):
            self.dropped_tokens = (indices < 0).sum().detach().float()
        else:  # another DeepSpeed gate layout: not reported
            self.dropped_tokens = None

    def _accumulate(self, counts: Tensor, dropped: Tensor | None) -> None:
        self.train_counts = counts if self.train_counts is None else self.train_counts + counts
        if dropped is not None:
            total = self.train_dropped
            self.train_dropped = dropped if total is None else total + dropped

    def take_train_counts(self) -> tuple[Tensor | None, Tensor | None]:
        """Tokens per expert and dropped assignments since the last call; resets them."""
        counts, dropped = self.train_counts, self.train_dropped
        self.train_counts = self.train_dropped = None
        return counts, dropped

    # --- evaluation replica -----------------------------------------------------------------

    def train(self, mode: bool = True) -> DeepSpeedMoELayer:
        """Collective when switching to eval: gathers all experts into the eval replica."""
        if not mode and self.training:
            self._replica = [self._gather_replica()]
        elif mode:
            self._replica = []
        return super().train(mode)

    @torch.no_grad()
    def _gather_replica(self) -> MoELayer:
        params = [p for expert in self.local_experts for p in expert.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        parts = [torch.empty_like(flat) for _ in range(self.ep_size)]
        dist.all_gather(parts, flat, group=self.ep_group)
        replica = copy.deepcopy(self._template[0]).to_empty(device=flat.device).eval()
        replica.router.proj.weight.copy_(self.gate_weight)
        targets = [p for expert in replica.experts for p in expert.parameters()]
        torch.nn.utils.vector_to_parameters(torch.cat(parts), targets)
        return replica

    def _eval_forward(self, x: Tensor) -> Tensor:
        replica = self._replica[0]
        out = replica(x)
        self.aux_loss, self.expert_counts = replica.aux_loss, replica.expert_counts
        self.dropped_tokens = replica.dropped_tokens
        return out

    # --- names ------------------------------------------------------------------------------

    def canonical_names(self, prefix: str) -> dict[str, str]:
        """`{wrapped parameter name: native name}` for this layer under module path `prefix`."""
        names = {f"{prefix}{GATE}": f"{prefix}router.proj.weight"}
        for local, _ in self.local_experts.named_parameters():
            index, rest = local.split(".", 1)
            global_id = self.first + int(index)
            names[f"{prefix}{LOCAL_EXPERTS}{local}"] = f"{prefix}experts.{global_id}.{rest}"
        return names


class ExpertParallelHook:
    """Translates checkpoints between the wrapped (per-rank) and native (full) model.

    The strategy's model-hook protocol: `consolidate`, `partition` and `step_metrics` are
    collective (every rank calls them at the same point).

    Args:
        layers: `{module path prefix ("blocks.0.ffn."): wrapper}` of every replaced layer.
        ep_group: The expert-parallel process group of this rank.
    """

    def __init__(self, layers: dict[str, DeepSpeedMoELayer], ep_group: Any) -> None:
        self.layers = layers
        self.ep_group = ep_group
        self.to_canonical: dict[str, str] = {}
        for prefix, layer in layers.items():
            self.to_canonical.update(layer.canonical_names(prefix))
        self.to_local = {v: k for k, v in self.to_canonical.items()}

    def owns(self, canonical: str) -> bool:
        """Whether `canonical` names a router or expert parameter of a replaced layer."""
        return any(
            canonical == f"{p}router.proj.weight" or canonical.startswith(f"{p}experts.")
            for p in self.layers
        )

    def consolidate(
        self, weights: dict[str, Tensor], state: dict[str, Any]
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """This rank's tensors -> every expert under its native name (collective)."""
        weights, state = self._rename(weights), self._rename(state)
        mine = (
            {n: t for n, t in weights.items() if is_expert_name(n) and self.owns(n)},
            {n: s for n, s in state.items() if is_expert_name(n) and self.owns(n)},
        )
        parts: list[Any] = [None] * dist.get_world_size(self.ep_group)
        dist.all_gather_object(parts, mine, group=self.ep_group)
        for part_weights, part_state in parts:
            weights.update(part_weights)
            state.update(part_state)
        return weights, state

    def _rename(self, named: dict[str, Any]) -> dict[str, Any]:
        return {self.to_canonical.get(n, n): v for n, v in named.items()}

    def partition(
        self, weights: dict[str, Tensor], state: dict[str, Any]
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Full native tensors -> this rank's router and local experts, under wrapped names."""
        return self._localize(weights), self._localize(state)

    def _localize(self, named: dict[str, Any]) -> dict[str, Any]:
        out = {n: v for n, v in named.items() if not self.owns(n)}
        for canonical, local in self.to_local.items():
            if canonical in named:
                out[local] = named[canonical]
        return out

    def step_metrics(self) -> dict[str, float]:
        """`train/expert<i>_tokens`, `train/expert<i>_frac` and `train/dropped_frac` of the
        last optimizer step, summed over its micro-batches, MoE layers and all ranks."""
        counts, dropped = self._local_totals()
        if counts is None:
            return {}
        totals = torch.cat([counts, dropped.reshape(1)]).double()
        if dist.is_initialized():
            dist.all_reduce(totals)
        routed = max(float(totals[:-1].sum()), 1.0)
        metrics = {f"train/expert{i}_tokens": float(c) for i, c in enumerate(totals[:-1])}
        metrics |= {f"train/expert{i}_frac": float(c) / routed for i, c in enumerate(totals[:-1])}
        metrics["train/dropped_frac"] = float(totals[-1]) / routed
        return metrics

    def _local_totals(self) -> tuple[Tensor | None, Tensor]:
        counts: Tensor | None = None
        dropped = torch.zeros(())
        for layer in self.layers.values():
            layer_counts, layer_dropped = layer.take_train_counts()
            if layer_counts is not None:
                layer_counts = layer_counts.cpu()
                counts = layer_counts if counts is None else counts + layer_counts
            if layer_dropped is not None:
                dropped = dropped + layer_dropped.cpu()
        return counts, dropped


def apply_deepspeed_moe(model: nn.Module, ep_size: int) -> ExpertParallelHook:
    """Replaces every native `MoELayer` of `model` in place; returns the checkpoint hook.

    Call after `deepspeed.init_distributed` and before `deepspeed.initialize`, on every rank.

    Raises:
        ValueError: `model` has no `MoELayer`, or `ep_size` does not divide an expert count
            (the job checks reject both before a worker starts).
    """
    natives = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
    if not natives:
        raise ValueError(f"expert_parallel={ep_size} but the model has no MoELayer")
    ep_group, ep_rank = expert_group(ep_size)
    layers: dict[str, DeepSpeedMoELayer] = {}
    for name, native in natives:
        if len(native.experts) % ep_size:
            raise ValueError(f"{name}: {len(native.experts)} experts, expert_parallel={ep_size}")
        wrapper = DeepSpeedMoELayer(native, ep_size, ep_group, ep_rank)
        replace_module(model, name, wrapper)
        layers[f"{name}." if name else ""] = wrapper
    logger.info(
        "expert parallel: %d MoE layers, %d of %d experts each on ep rank %d",
        len(layers),
        next(iter(layers.values())).local,
        next(iter(layers.values())).num_experts,
        ep_rank,
    )
    return ExpertParallelHook(layers, ep_group)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Sets submodule `name` (a dotted path; not the root) of `model` to `new`."""
    if not name:
        raise ValueError("the model itself is an MoELayer: wrap it in a container module")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def merge_expert_groups(
    optimizer: dict[str, Any], scheduler: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer (`torch.optim` layout) and LR scheduler state with DeepSpeed's groups joined.

    DeepSpeed splits the user's one parameter group into a dense group and an expert group per
    ep size, with the same hyperparameters; the checkpoint keeps the user's one group (what
    `single` saves, so `single` loads it) when their hyperparameters agree, and the split
    layout otherwise. The scheduler's per-group lists (`base_lrs`, `_last_lr`, ...) follow.
    """
    groups = optimizer["param_groups"]
    plain = [{k: v for k, v in g.items() if k not in (*GROUP_KEYS, "params")} for g in groups]
    if len(groups) < 2 or any(p != plain[0] for p in plain):
        return optimizer, scheduler
    params = sorted(i for g in groups for i in g["params"])
    merged = {**optimizer, "param_groups": [{**plain[0], "params": params}]}
    count = len(groups)
    return merged, {
        k: v[:1] if isinstance(v, list) and len(v) == count else v for k, v in scheduler.items()
    }


def widen_groups(
    groups: list[dict[str, Any]], scheduler: dict[str, Any], live: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The inverse at load: one saved group's hyperparameters and scheduler lists serve each
    of the `live` optimizer groups. Anything else is returned unchanged."""
    if len(groups) != 1 or live == 1:
        return groups, scheduler
    widened = {
        k: v * live if isinstance(v, list) and len(v) == 1 else v for k, v in scheduler.items()
    }
    return groups * live, widened


__all__ = [
    "DeepSpeedMoELayer",
    "ExpertParallelHook",
    "apply_deepspeed_moe",
    "is_expert_name",
    "merge_expert_groups",
    "widen_groups",
]
