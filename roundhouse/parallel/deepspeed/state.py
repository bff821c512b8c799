"""World-size independent state for the DeepSpeed strategy: gather ZeRO partitions, re-partition.

DeepSpeed's own checkpoints are per-rank partitions that load only at the world size that wrote
them (its "universal checkpoint" conversion needs metadata only Megatron-DeepSpeed supplies).
roundhouse instead saves what `single` saves:

- `model`: the consolidated fp32 weights, named as `model.state_dict()` names them;
- `optimizer`: plain `torch.optim` layout, `{"state": {i: {...}}, "param_groups": [...]}`, with
  each parameter's full (un-partitioned) state and `i` its index among the model's trainable
  parameters (the order `single` uses, so checkpoints move between strategies);
- `scheduler`: the LR scheduler's state.

Gathering uses DeepSpeed's tensor-fragment API (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`), which all-reduces each parameter's fragments over the
data-parallel group; loading writes every rank's own fragment back with the `safe_set_*`
twins, after creating the flat optimizer state a fresh engine does not have yet (torch
optimizers create it lazily on the first step). Every function here is collective: all ranks
call it with the parameters in the same order.

Only called from the DeepSpeed strategy; imports deepspeed lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Per-parameter optimizer state, keyed by the parameter's canonical (model.state_dict) name.
NamedState = dict[str, dict[str, Any]]


class ZeroState:
    """Reads and writes full per-parameter tensors of one DeepSpeed engine.

    Args:
        engine: the `DeepSpeedEngine` (or `PipelineEngine`).
        zero_stage: the engine's ZeRO stage (0 means a plain torch optimizer).
    """

    def __init__(self, engine: Any, zero_stage: int) -> None:
        self.engine = engine
        self.stage = zero_stage
        # The torch optimizer that holds the (flat, partitioned) fp32 master state.
        self.base = engine.optimizer.optimizer if zero_stage > 0 else engine.optimizer

    # --- flat partitions (ZeRO) -------------------------------------------------------------

    def flats(self) -> list[Tensor]:
        """The base optimizer's parameters: one flat fp32 partition per group under ZeRO.

        ZeRO-3 puts a sub-group's flat partition into the base optimizer's param group only
        for the duration of its step (the groups are empty otherwise), so its flats are read
        from the engine's optimizer.
        """
        if self.stage == 3:
            return list(self.engine.optimizer.fp32_partitioned_groups_flat)
        return [p for group in self.base.param_groups for p in group["params"]]

    def state_keys(self) -> tuple[list[str], dict[str, Any]]:
        """Parameter-shaped state keys and scalar state (e.g. Adam's `step`) of the optimizer.

        The same on every rank (every rank's partition has the same keys), and empty before
        the first step.
        """
        flats = self.flats()
        state = self.base.state.get(flats[0], {}) if flats else {}
        tensors = [k for k, v in state.items() if _is_param_shaped(v, flats[0])]
        scalars = {k: _clone(v) for k, v in state.items() if k not in tensors}
        return tensors, scalars

    # --- reading ----------------------------------------------------------------------------

    def full_param(self, param: nn.Parameter) -> Tensor:
        """The fp32 master value of `param`, whole (collective under ZeRO)."""
        if self.stage == 0:
            return param.detach().float().cpu().clone()
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().cpu().clone()

    def full_state(self, param: nn.Parameter, keys: list[str]) -> dict[str, Tensor]:
        """`param`'s optimizer state tensors, whole (collective under ZeRO)."""
        if self.stage == 0:
            state = self.base.state.get(param, {})
            return {k: _clone(v) for k, v in state.items()}
        from deepspeed.utils import safe_get_full_optimizer_state

        return {k: safe_get_full_optimizer_state(param, k).detach().cpu().clone() for k in keys}

    def gather(self, named: list[tuple[str, nn.Parameter]]) -> tuple[dict, NamedState]:
        """Full weights and optimizer state of `named` parameters (same order on all ranks)."""
        keys, scalars = self.state_keys() if self.stage > 0 else ([], {})
        if self.stage in (1, 2) and keys:
            self._relink_state()
        weights: dict[str, Tensor] = {}
        state: NamedState = {}
        for name, param in named:
            weights[name] = self.full_param(param)
            entry = self.full_state(param, keys)
            if self.stage > 0 and entry:
                entry = {**{k: _clone(v) for k, v in scalars.items()}, **entry}
            if entry:
                state[name] = entry
        return weights, state

    def _relink_state(self) -> None:
        """Point every parameter's fragment at the flat optimizer state of its group.

        DeepSpeed (ZeRO-1/2) links them once, right after the first group's first step, when
        later groups (MoE expert groups, several user groups) have no state yet.
        """
        self.engine.optimizer._hp_optimizer_states_linked = False
        self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    # --- writing ----------------------------------------------------------------------------

    def load(
        self, named: list[tuple[str, nn.Parameter]], weights: dict[str, Tensor], state: NamedState
    ) -> None:
        """Write full weights and optimizer state; each rank keeps its own partition."""
        if self.stage == 0:
            self._load_plain(named, weights, state)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        sample = next((state[n] for n, _ in named if n in state), None)
        tensor_keys = self._ensure_flat_state(sample)
        self._load_low_precision(named, weights)
        for name, param in named:
            safe_set_full_fp32_param(param, weights[name].to(_device_of(param)))
            for key in tensor_keys:
                value = state[name][key]
                safe_set_full_optimizer_state(param, value.to(_device_of(param)), key)

    def _load_plain(
        self, named: list[tuple[str, nn.Parameter]], weights: dict[str, Tensor], state: NamedState
    ) -> None:
        with torch.no_grad():
            for name, param in named:
                param.copy_(weights[name])
                if name in state:
                    self.base.state[param] = {
                        k: _clone(v).to(param.device) if _is_param_shaped(v, param) else _clone(v)
                        for k, v in state[name].items()
                    }

    def _ensure_flat_state(self, sample: dict[str, Any] | None) -> list[str]:
        """Create the flat optimizer state the saved state goes into; return its tensor keys."""
        if sample is None:
            return []  # saved before the first step: nothing to restore
        tensor_keys = [k for k, v in sample.items() if torch.is_tensor(v) and v.dim() > 0]
        for flat in self.flats():
            entry = self.base.state.setdefault(flat, {})
            for key, value in sample.items():
                if key in tensor_keys:
                    entry.setdefault(key, torch.zeros_like(flat))
                else:
                    entry[key] = _clone(value)
        if self.stage in (1, 2):
            self._relink_state()  # point every parameter's fragment at the new state tensors
        return tensor_keys

    def _load_low_precision(
        self, named: list[tuple[str, nn.Parameter]], weights: dict[str, Tensor]
    ) -> None:
        """The model's own (forward) copy of each parameter, beside the fp32 master."""
        if self.stage < 3:
            with torch.no_grad():
                for name, param in named:
                    param.copy_(weights[name].to(param.dtype))
            return
        import deepspeed

        params = [p for _, p in named]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
            for name, param in named:
                param.copy_(weights[name].to(param.dtype))

    def set_param_groups(self, groups: list[dict[str, Any]]) -> None:
        """Restore saved hyperparameters (lr, initial_lr, ...) into the optimizer's groups."""
        for live, saved in zip(self.base.param_groups, groups, strict=False):
            for key, value in saved.items():
                if key != "params" and key in live:
                    live[key] = value

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's hyperparameters per group, without the (flat) parameters."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self.base.param_groups]


def _is_param_shaped(value: Any, param: Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0


def _clone(value: Any) -> Any:
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


def _device_of(param: nn.Parameter) -> torch.device:
    tensor = getattr(param, "ds_tensor", None)
    return tensor.device if tensor is not None else param.device


def to_torch_layout(
    state: NamedState,
    groups: list[dict[str, Any]],
    order: list[str],
    group_of: dict[str, int],
) -> dict[str, Any]:
    """Named per-parameter state -> `torch.optim.Optimizer.state_dict()` layout.

    Args:
        state: full state per parameter name.
        groups: hyperparameters of each optimizer group.
        order: trainable parameter names in `model.parameters()` order (the indices).
        group_of: parameter name -> its group.
    """
    index = {name: i for i, name in enumerate(order)}
    out_groups = [{**g, "params": []} for g in groups]
    for name in order:
        out_groups[group_of.get(name, 0)]["params"].append(index[name])
    return {"state": {index[n]: s for n, s in state.items()}, "param_groups": out_groups}


def from_torch_layout(saved: dict[str, Any], order: list[str]) -> tuple[NamedState, list[dict]]:
    """The inverse of `to_torch_layout`: named state and group hyperparameters."""
    state = {order[int(i)]: s for i, s in saved.get("state", {}).items()}
    return state, saved.get("param_groups", [])


def merge_named(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Union of dicts gathered from several ranks (each rank holds some names)."""
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    return merged
