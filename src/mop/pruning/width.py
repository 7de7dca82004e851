"""The width step: how many KV groups and MLP neurons each layer loses to remove a budget, and which. The budget
is p_ℓ parameters (the paper's matching), or, with speed targets, the depth step's predicted latency saving
(`UnitCosts` says what one unit costs in the budget's units).

Attention units are coarse (one KV group in every layer can cost more than a whole layer), so the attention
share of each step is accumulated across width steps in units of groups per layer and spent only as whole
groups that fit the step's budget; the fraction is carried, never dropped. The MLP absorbs the rest, so a
step removes p_ℓ to within one neuron per layer. Where only some group counts can be exported (a LLaMA with
biases: its head count must keep dividing hidden_size), a step spends the most due groups that land on one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from mop.errors import MopError
from mop.latency.model import UnitLatency
from mop.models.adapters import LayerShape
from mop.pruning.criteria import UnitScores


@dataclass(frozen=True)
class WidthUnits:
    """What a width step may leave in a layer: a KV-group count in `kv_counts` (None: any) and an MLP width
    that is a multiple of `neuron_block` neurons."""

    kv_counts: frozenset[int] | None = None
    neuron_block: int = 1


@dataclass(frozen=True)
class Alignment:
    """Shapes a serving engine accepts. Tensor parallelism of degree N in vLLM shards the query heads evenly,
    the KV heads evenly or, when there are fewer KV heads than N, replicates them (N a multiple of their
    count), and the MLP evenly; `mlp_multiple` further keeps every shard's MLP width a multiple of a
    GEMM-friendly block (64 or 128 neurons)."""

    tensor_parallel: int = 1
    mlp_multiple: int = 1

    @property
    def neuron_block(self) -> int:
        return self.tensor_parallel * self.mlp_multiple

    def kv_heads_ok(self, kv_heads: int, n_rep: int) -> bool:
        n = self.tensor_parallel
        return (kv_heads * n_rep) % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)

    def problems(self, shape: LayerShape) -> list[str]:
        """What in `shape` this alignment refuses (empty: nothing)."""
        found = []
        if not self.kv_heads_ok(shape.kv_heads, shape.n_rep):
            found.append(f"{shape.heads} query heads over {shape.kv_heads} KV heads do not shard over "
                         f"{self.tensor_parallel} devices")
        if shape.intermediate % self.neuron_block:
            found.append(f"MLP width {shape.intermediate} is not a multiple of {self.neuron_block} "
                         f"(tensor parallel {self.tensor_parallel} × MLP multiple {self.mlp_multiple})")
        return found

    def check(self, shape: LayerShape, model: str) -> None:
        """Refuse, before any work, a model whose own shape this alignment refuses (steps keep, never make it)."""
        if problems := self.problems(shape):
            raise MopError(f"{model} cannot keep the asked alignment: {'; '.join(problems)}")

    def units(self, shape: LayerShape, kv_counts: frozenset[int] | None) -> WidthUnits:
        """The units of a width step from `shape`: `kv_counts` (the exportable counts; None: any) restricted
        to the counts that shard."""
        if self.tensor_parallel == 1:
            return WidthUnits(kv_counts, self.neuron_block)
        counts = range(1, shape.kv_heads + 1) if kv_counts is None else kv_counts
        return WidthUnits(frozenset(k for k in counts if self.kv_heads_ok(k, shape.n_rep)), self.neuron_block)


@dataclass(frozen=True)
class UnitCosts:
    """What one width unit of one layer costs, in the units of a step's budget (parameters or predicted seconds)."""

    group: float  # one KV group with its n_rep query heads
    neuron: float  # one MLP neuron
    attention_share: float  # attention's share of what a layer's widths cost

    @classmethod
    def of_params(cls, shape: LayerShape) -> UnitCosts:
        """The paper's matching: units cost their parameters."""
        return cls(shape.group_params, shape.neuron_params,
                   shape.attention_params / (shape.attention_params + shape.mlp_params))

    @classmethod
    def of_latency(cls, unit: UnitLatency, shape: LayerShape, layers: int) -> UnitCosts:
        """Units cost their predicted seconds (`LatencyModel.unit_latency`, whose unit is a row: one unit out of
        every layer). A unit predicted free is given a billionth of a layer's seconds, so the plan stays finite."""
        least = 1e-9 * (unit.layer or 1.0)
        group, neuron = max(unit.kv_group, least) / layers, max(unit.neuron, least) / layers
        attention, mlp = group * shape.kv_heads, neuron * shape.intermediate
        return cls(group, neuron, attention / (attention + mlp))


@dataclass(frozen=True)
class WidthPlan:
    groups_per_layer: int  # KV groups removed from every layer
    neurons_per_layer: int  # MLP neurons removed from every layer
    planned: float  # the budget asked for (p_ℓ parameters, or seconds when matched in latency)
    achieved: float  # what this plan removes, in the budget's units
    carry_in: float  # attention accumulator before the step (groups per layer)
    carry_out: float  # accumulator after the step, if this candidate is chosen
    neuron_carry_in: float = 0.0  # MLP accumulator (neurons per layer), carried only with neuron blocks > 1
    neuron_carry_out: float = 0.0

    def record(self) -> dict:
        return asdict(self)

    def shape_after(self, shape: LayerShape) -> LayerShape:
        """The layer shape this plan leaves."""
        return replace(shape, kv_heads=shape.kv_heads - self.groups_per_layer,
                       intermediate=shape.intermediate - self.neurons_per_layer)


def plan_width(shape: LayerShape, n_layers: int, budget: float, carry: float, units: WidthUnits = WidthUnits(),
               neuron_carry: float = 0.0, costs: UnitCosts | None = None) -> WidthPlan:
    """Split `budget` between attention and MLP in proportion to their share of a layer, in the `units` a layer
    may be left with; where the MLP, down to one neuron (block), cannot take its part, attention takes more
    groups, as many as bring the step nearest to `budget`. `carry` and `neuron_carry`: what earlier width steps
    left due (groups and neurons per layer; a step that took more groups than due leaves a debt). `costs`: what
    a unit costs in the budget's units (default: its parameters)."""
    costs = costs or UnitCosts.of_params(shape)
    row_cost = costs.group * n_layers  # one group out of every layer
    due = carry + budget * costs.attention_share / row_cost
    most = max(0, min(math.floor(due), shape.kv_heads - 1, budget // row_cost))
    allowed = [g for g in range(shape.kv_heads)
               if g == 0 or units.kv_counts is None or shape.kv_heads - g in units.kv_counts]
    groups = max(g for g in allowed if g <= most)
    neuron_row = costs.neuron * n_layers
    block, cap = units.neuron_block, shape.intermediate - units.neuron_block

    def mlp(groups: int) -> tuple[float, int]:
        """Neurons per layer due beside `groups` groups, and those taken (whole blocks, one block kept)."""
        wanted = (budget - groups * row_cost) / neuron_row + neuron_carry
        return wanted, max(0, min(block * round(wanted / block), cap))

    wanted, neurons = mlp(groups)
    if block * round(wanted / block) > cap:  # the MLP cannot take the rest: attention takes it, in the allowed
        # count that brings the step nearest to `budget` (a group out of every layer may cost more than the rest)
        groups = min((g for g in allowed if g >= groups),
                     key=lambda g: abs(g * row_cost + mlp(g)[1] * neuron_row - budget))
        wanted, neurons = mlp(groups)
    if groups == 0 and neurons == 0 and block > 1 and shape.intermediate > block:
        neurons = block  # a step always removes something; the excess is carried as a debt
    achieved = groups * row_cost + neurons * neuron_row
    return WidthPlan(groups, neurons, budget, achieved, carry, due - groups,
                     neuron_carry, wanted - neurons if block > 1 else 0.0)


StepCosts = Callable[[LayerShape], tuple[float, UnitCosts | None]]  # a width step's budget and unit costs


def narrowest(shape: LayerShape, n_layers: int, step: StepCosts, units: WidthUnits = WidthUnits()) -> LayerShape:
    """The layer shape at which width steps alone can remove nothing more: the planner's own sequence of shapes,
    simulated from `shape` (no weights), each step's budget and costs being `step(shape)`."""
    carry = neuron_carry = 0.0
    while True:
        budget, costs = step(shape)
        plan = plan_width(shape, n_layers, budget, carry, units, neuron_carry, costs)
        if plan.achieved == 0:
            return shape
        shape, carry, neuron_carry = plan.shape_after(shape), plan.carry_out, plan.neuron_carry_out


def width_floor(shape: LayerShape, n_layers: int, fixed: int, units: WidthUnits = WidthUnits()) -> int:
    """Parameters of one layer when width steps matched in parameters can remove nothing more (`narrowest`),
    each step's budget being one layer (`fixed`, the parameters no width step removes — norms, o_proj and
    down_proj biases — plus attention and MLP)."""
    layer = lambda s: fixed + s.attention_params + s.mlp_params
    return layer(narrowest(shape, n_layers, lambda s: (layer(s), None), units))


def lowest_units(scores: list[UnitScores], plan: WidthPlan) -> tuple[list[list[int]], list[list[int]]]:
    """Per layer, the sorted indices of the `plan` lowest-scoring KV groups and neurons (ties: lower index)."""
    groups = [_lowest(s.groups, plan.groups_per_layer) for s in scores]
    neurons = [_lowest(s.neurons, plan.neurons_per_layer) for s in scores]
    return groups, neurons


def _lowest(values: torch.Tensor, k: int) -> list[int]:
    order = torch.sort(values, stable=True).indices
    return sorted(order[:k].tolist())
