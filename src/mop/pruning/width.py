"""The width step: how many KV groups and MLP neurons each layer loses to remove p_ℓ parameters, and which.

Attention units are coarse (one KV group in every layer can cost more than a whole layer), so the attention
share of each step is accumulated across width steps in units of groups per layer and spent only as whole
groups that fit the step's budget; the fraction is carried, never dropped. The MLP absorbs the rest, so a
step removes p_ℓ to within one neuron per layer. Where only some group counts can be exported (a LLaMA with
biases: its head count must keep dividing hidden_size), a step spends the most due groups that land on one.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace

import torch

from mop.models.adapters import LayerShape
from mop.pruning.criteria import UnitScores


@dataclass(frozen=True)
class WidthPlan:
    groups_per_layer: int  # KV groups removed from every layer
    neurons_per_layer: int  # MLP neurons removed from every layer
    planned: int  # parameters asked for (p_ℓ)
    achieved: int  # parameters this plan removes
    carry_in: float  # attention accumulator before the step (groups per layer)
    carry_out: float  # accumulator after the step, if this candidate is chosen

    def record(self) -> dict:
        return asdict(self)

    def shape_after(self, shape: LayerShape) -> LayerShape:
        """The layer shape this plan leaves."""
        return replace(shape, kv_heads=shape.kv_heads - self.groups_per_layer,
                       intermediate=shape.intermediate - self.neurons_per_layer)


def plan_width(shape: LayerShape, n_layers: int, budget: int, carry: float,
               kv_counts: Collection[int] | None = None) -> WidthPlan:
    """Split `budget` parameters between attention and MLP in proportion to their share of a layer.
    `kv_counts`: the KV-group counts a layer may be left with (None: any)."""
    attention_share = shape.attention_params / (shape.attention_params + shape.mlp_params)
    row_cost = shape.group_params * n_layers  # one group out of every layer
    due = carry + budget * attention_share / row_cost
    most = max(0, min(math.floor(due), shape.kv_heads - 1, budget // row_cost))
    groups = max(g for g in range(most + 1) if g == 0 or kv_counts is None or shape.kv_heads - g in kv_counts)
    neuron_row = shape.neuron_params * n_layers
    neurons = round((budget - groups * row_cost) / neuron_row)
    neurons = max(0, min(neurons, shape.intermediate - 1))
    achieved = groups * row_cost + neurons * neuron_row
    return WidthPlan(groups, neurons, budget, achieved, carry, due - groups)


def width_floor(shape: LayerShape, n_layers: int, fixed: int, kv_counts: Collection[int] | None = None) -> int:
    """Parameters of one layer when width steps alone can remove nothing more: the planner's own sequence of
    shapes, simulated from `shape` (no weights), each step's budget being one layer (`fixed`, the parameters
    no width step removes — norms, o_proj and down_proj biases — plus attention and MLP)."""
    carry = 0.0
    while True:
        layer = fixed + shape.attention_params + shape.mlp_params
        plan = plan_width(shape, n_layers, layer, carry, kv_counts)
        if plan.achieved == 0:
            return layer
        shape, carry = plan.shape_after(shape), plan.carry_out


def lowest_units(scores: list[UnitScores], plan: WidthPlan) -> tuple[list[list[int]], list[list[int]]]:
    """Per layer, the sorted indices of the `plan` lowest-scoring KV groups and neurons (ties: lower index)."""
    groups = [_lowest(s.groups, plan.groups_per_layer) for s in scores]
    neurons = [_lowest(s.neurons, plan.neurons_per_layer) for s in scores]
    return groups, neurons


def _lowest(values: torch.Tensor, k: int) -> list[int]:
    order = torch.sort(values, stable=True).indices
    return sorted(order[:k].tolist())
