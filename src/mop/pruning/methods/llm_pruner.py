"""LLM-Pruner (Ma et al. 2023, "LLM-Pruner: On the Structural Pruning of Large Language Models") with its
element-wise first-order Taylor importance ("element1"): a weight's importance is |w · ∂L/∂w|, the first-order
estimate of the loss change when it is zeroed, and a coupled group's importance is the sum over its weights:

- a KV group: its n_rep query heads' q_proj rows, its k_proj and v_proj rows (with their biases, if any) and
  the o_proj columns that read those query heads;
- an MLP neuron: its gate_proj and up_proj rows (with biases, if any) and its down_proj column.

L is the mean next-token loss over every real token of the run's calibration prompts; its gradient is
accumulated over the calibration batches before the product is taken, as one backward pass over the whole set
would give. Every layer loses the same number of KV groups and neurons (the lowest-importance ones in that
layer), so the checkpoint has uniform widths; docs/design.md ("Peer methods") lists where this departs
from the paper.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from mop.data import Batch
from mop.latency.model import ModelShape
from mop.models import DecoderAdapter, LayerShape, count_params, input_device
from mop.pruning.criteria import UnitScores
from mop.pruning.methods.oneshot import OneShotPruner
from mop.pruning.state import RunState
from mop.pruning.targets import Target, layers_shape
from mop.pruning.width import UnitCosts, WidthPlan, WidthUnits, lowest_units


@contextmanager
def gradients_for(model: nn.Module, parameters: list[nn.Parameter]) -> Iterator[None]:
    """Within the block only `parameters` require gradients (autograd then skips, e.g., the embedding's)."""
    before = {p: p.requires_grad for p in model.parameters()}
    wanted = set(parameters)
    try:
        for p in before:
            p.requires_grad_(p in wanted)
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)


def predicted_tokens(batch: Batch) -> int:
    """Positions whose next token is a real token (right padding: every real token but the first)."""
    return int(batch.attention_mask[:, 1:].sum())


def loss_gradients(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch],
                   parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    """∂L/∂p for each of `parameters` (float32, p's shape), L = the mean next-token cross-entropy over all real
    tokens of all batches. One backward pass per batch; the gradients are summed in one buffer per parameter.
    Logits are formed at real positions only ([N, V], not [B, T, V])."""
    tokens = sum(predicted_tokens(b) for b in batches)
    head = adapter.text_model(model).get_output_embeddings()
    device = input_device(model)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in parameters]
    with gradients_for(model, parameters), torch.enable_grad():
        for batch in tqdm(batches, desc="LLM-Pruner gradients", unit="batch"):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            hidden = adapter.backbone(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            predicts = mask[:, 1:].bool()  # [B, T-1]: position t predicts token t+1
            logits = head(hidden[:, :-1][predicts])  # [N, V]
            loss = F.cross_entropy(logits.float(), ids[:, 1:][predicts], reduction="sum") / tokens
            for total, grad in zip(sums, torch.autograd.grad(loss, parameters), strict=True):
                total += grad.float()
    return sums


def _rows(product: torch.Tensor, units: int) -> torch.Tensor:
    """[out, ...] → [units]: the sum over each unit's consecutive block of rows (and all columns)."""
    return product.reshape(units, -1).sum(1, dtype=torch.float64)


def _columns(product: torch.Tensor, units: int) -> torch.Tensor:
    """[out, in] → [units]: the sum over each unit's consecutive block of columns (and all rows)."""
    return product.reshape(product.shape[0], units, -1).sum((0, 2), dtype=torch.float64)


def taylor_importance(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch]) -> list[UnitScores]:
    """Per layer, Σ |w · ∂L/∂w| over each KV group's and each MLP neuron's weights, float64 (see module doc)."""
    shape = adapter.shape(model)
    layers = adapter.layers(model)
    members = [p for layer in layers for p in (*layer.self_attn.parameters(), *layer.mlp.parameters())]
    grads = dict(zip(members, loss_gradients(model, adapter, batches, members), strict=True))

    def saliency(p: nn.Parameter) -> torch.Tensor:
        """|w · ∂L/∂w| elementwise, float32; the gradient buffer is freed once used."""
        return (p.detach().float() * grads.pop(p)).abs_()

    scores = []
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = (attention.q_proj, attention.k_proj, attention.v_proj), (mlp.gate_proj, mlp.up_proj)
        groups = sum(_rows(saliency(proj.weight), shape.kv_heads) for proj in qkv)
        groups += sum(_rows(saliency(proj.bias), shape.kv_heads) for proj in qkv if proj.bias is not None)
        groups += _columns(saliency(attention.o_proj.weight), shape.kv_heads)
        neurons = sum(_rows(saliency(proj.weight), shape.intermediate) for proj in gate_up)
        neurons += sum(_rows(saliency(proj.bias), shape.intermediate) for proj in gate_up if proj.bias is not None)
        neurons += _columns(saliency(mlp.down_proj.weight), shape.intermediate)
        scores.append(UnitScores(groups, neurons))
    return scores


def uniform_plan(shape: LayerShape, n_layers: int, budget: float, units: WidthUnits = WidthUnits(),
                 costs: UnitCosts | None = None) -> WidthPlan:
    """The KV groups and neurons every layer loses so that at least `budget` goes in all (parameters, or what
    `costs` says a unit costs: predicted seconds for a speed target): attention
    takes its share of the layer, as the nearest allowed number of groups (a count in `units.kv_counts`, at
    least one group kept) that fits a layer's part of the budget; the MLP takes the rest, rounded up to whole
    blocks of `units.neuron_block` neurons. Only if the MLP cannot take the rest (it keeps one block) does
    attention take the fewest allowed groups more that let it; when none does, the plan falls short (the run
    refuses such a target, see `OneShotPruner.run`)."""
    costs = costs or UnitCosts.of_params(shape)
    per_layer = budget / n_layers
    block, cap = units.neuron_block, shape.intermediate - units.neuron_block
    allowed = [g for g in range(shape.kv_heads)
               if g == 0 or units.kv_counts is None or shape.kv_heads - g in units.kv_counts]

    def mlp_rest(groups: int) -> int:
        """Neurons (whole blocks) that take at least a layer's budget beside `groups` KV groups."""
        return block * math.ceil((per_layer - groups * costs.group) / costs.neuron / block)

    planned = min(round(per_layer * costs.attention_share / costs.group), int(per_layer // costs.group))
    groups = max(g for g in allowed if g <= planned)
    if mlp_rest(groups) > cap:
        groups = next((g for g in allowed if g > groups and mlp_rest(g) <= cap), allowed[-1])
    neurons = max(0, min(mlp_rest(groups), cap))
    achieved = n_layers * (groups * costs.group + neurons * costs.neuron)
    return WidthPlan(groups, neurons, budget, achieved, carry_in=0.0, carry_out=0.0)


class LLMPruner(OneShotPruner):
    def settings(self) -> dict:
        c = self.config
        alignment = {k: v for k, v in c.identity().items() if k in ("tensor_parallel", "mlp_multiple")}  # if asked
        return {"calib": c.calib, "calib_samples": c.calib_samples, "calib_max_length": c.calib_max_length,
                "batch_size": c.batch_size, **alignment}

    def narrowest_layer(self) -> LayerShape:
        """Every layer's fewest allowed KV groups (one, unless aligned) and one neuron (block)."""
        adapter, model = self.loaded.adapter, self.loaded.model
        shape = adapter.shape(model)
        units = self.config.alignment.units(shape, adapter.kv_head_counts(model))
        return replace(shape, kv_heads=min(units.kv_counts) if units.kv_counts else 1,
                       intermediate=units.neuron_block)

    def most_compression(self) -> float:
        shape, narrowest = self.loaded.adapter.shape(self.loaded.model), self.narrowest_layer()
        removable = ((shape.kv_heads - narrowest.kv_heads) * shape.group_params
                     + (shape.intermediate - narrowest.intermediate) * shape.neuron_params)
        return self.goals.dense.layers * removable / self.original_params

    def smallest_shape(self) -> ModelShape:
        return layers_shape(self.goals.dense, self.narrowest_layer(), self.goals.dense.layers)

    def score(self) -> dict:
        scores = taylor_importance(self.loaded.model, self.loaded.adapter, self.calibration)
        return {"groups": [s.groups.tolist() for s in scores], "neurons": [s.neurons.tolist() for s in scores]}

    def cut(self, model: nn.Module, scores: dict, target: Target, state: RunState) -> list[dict]:
        """Remove from every layer its lowest-importance units, as many as `uniform_plan` says for `target`."""
        logged = next((r for r in state.iterations if r.get(target.key) == target.value), None)
        if logged is not None:
            self.cut_units(model, width=logged["removed"])
            return [logged]
        started = time.perf_counter()
        adapter = self.loaded.adapter
        shape = adapter.shape(model)
        budget, costs = self.goals.needed(target, shape)
        units = self.config.alignment.units(shape, adapter.kv_head_counts(model))
        plan = uniform_plan(shape, len(adapter.layers(model)), budget, units, costs)
        unit_scores = [UnitScores(torch.tensor(g, dtype=torch.float64), torch.tensor(n, dtype=torch.float64))
                       for g, n in zip(scores["groups"], scores["neurons"], strict=True)]
        groups, neurons = lowest_units(unit_scores, plan)
        self.cut_units(model, width={"groups": groups, "neurons": neurons})
        params = count_params(model)
        record = {"iteration": len(state.iterations) + 1, "choice": "W", "decided_by": "llm_pruner", "layer": None,
                  **target.record(), "width_plan": plan.record(), "params": params,
                  "compression": 1 - params / self.original_params, "seconds": round(time.perf_counter() - started, 3),
                  **self.goals.record(self.shape(model)), "removed": {"groups": groups, "neurons": neurons}}
        state.iterations.append(record)
        return [record]
