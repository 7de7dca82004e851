"""Exact parameter matching of the width step, on coarse and fine attention shapes."""

import math

import pytest

from mop.models.adapters import LayerShape
from mop.pruning.width import plan_width, width_floor

# (shape, layers): a Qwen2-0.5B-like coarse GQA (14 heads / 2 KV heads, d_h 64), SmolLM2, LLaMA-2-7B (MHA)
SHAPES = {
    "qwen2-0.5b": (LayerShape(896, 64, 2, 7, 4864, qkv_bias=True, mlp_bias=False), 24),
    "smollm2": (LayerShape(576, 64, 3, 3, 1536, qkv_bias=False, mlp_bias=False), 30),
    "llama2-7b": (LayerShape(4096, 128, 32, 1, 11008, qkv_bias=False, mlp_bias=False), 32),
}
NORMS = 2  # RMSNorm weights per layer, in units of d


def layer_total(shape: LayerShape) -> int:
    return shape.attention_params + shape.mlp_params + NORMS * shape.hidden


def shrink(shape: LayerShape, groups: int, neurons: int) -> LayerShape:
    return LayerShape(shape.hidden, shape.head_dim, shape.kv_heads - groups, shape.n_rep,
                      shape.intermediate - neurons, shape.qkv_bias, shape.mlp_bias)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_width_steps_match_layer_params_and_carry_attention(name):
    shape, layers = SHAPES[name]
    coarse = shape.group_params * layers > layer_total(shape)  # one group out of every layer costs more than a layer
    assert coarse == (name != "llama2-7b")
    carry, due_total, groups_total = 0.0, 0.0, 0
    for step in range(12):
        budget = layer_total(shape)  # p_ℓ of the layer a depth step would remove
        plan = plan_width(shape, layers, budget, carry)
        # removes p_ℓ within one neuron per layer (< 3·d·n_layers)
        assert abs(plan.achieved - budget) < shape.neuron_params * layers
        assert plan.achieved == layers * (plan.groups_per_layer * shape.group_params
                                          + plan.neurons_per_layer * shape.neuron_params)
        # the attention accumulator is conserved: what was due is either removed or carried
        share = shape.attention_params / (shape.attention_params + shape.mlp_params)
        due_total += budget * share / (shape.group_params * layers)
        groups_total += plan.groups_per_layer
        assert plan.carry_out == pytest.approx(due_total - groups_total)
        if coarse:  # attention waits: nothing is spent, everything due is carried
            assert plan.groups_per_layer == 0
        else:  # fine attention: every whole group due is spent at once, less than one is carried
            assert 0 <= plan.carry_out < 1
        carry = plan.carry_out
        shape = shrink(shape, plan.groups_per_layer, plan.neurons_per_layer)
    assert groups_total == (0 if coarse else math.floor(due_total))


def test_coarse_groups_wait_until_they_fit():
    """One Qwen2-0.5B group out of all 24 layers costs more than a layer: attention waits, MLP takes it all."""
    shape, layers = SHAPES["qwen2-0.5b"]
    plan = plan_width(shape, layers, layer_total(shape), carry=5.0)
    assert shape.group_params * layers > layer_total(shape)
    assert plan.groups_per_layer == 0 and plan.carry_out > 5.0
    # with fewer layers (after depth steps) a due group fits and is taken
    budget = layer_total(shape)
    plan = plan_width(shape, 8, budget, carry=0.99)
    due = budget * shape.attention_params / (shape.attention_params + shape.mlp_params) / (shape.group_params * 8)
    assert plan.groups_per_layer == 1 and plan.carry_out == pytest.approx(0.99 + due - 1)


def test_never_prunes_the_last_unit():
    shape = LayerShape(64, 16, 1, 2, 3, qkv_bias=False, mlp_bias=False)
    plan = plan_width(shape, 2, 10**9, carry=3.0)
    assert plan.groups_per_layer == 0 and plan.neurons_per_layer == 2
    assert plan.achieved < plan.planned


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_width_floor_follows_the_planner(name):
    """Width steps alone, each a layer's worth: on the coarse shapes attention is never pruned and the MLP goes
    down to one neuron; on two layers any shape goes down to one group and one neuron."""
    shape, layers = SHAPES[name]
    fixed = NORMS * shape.hidden
    one_neuron = fixed + shape.attention_params + shape.neuron_params
    thinnest = fixed + shape.group_params + shape.neuron_params
    if name != "llama2-7b":
        assert width_floor(shape, layers, fixed) == one_neuron
    else:  # 32 heads: some are pruned while they fit, then a head out of 32 layers outgrows the shrunk layer
        assert thinnest < width_floor(shape, layers, fixed) < one_neuron
    assert width_floor(shape, 2, fixed) == thinnest
