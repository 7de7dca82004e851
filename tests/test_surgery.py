"""Physical pruning is exact: a unit whose contribution is zero can be removed without changing the logits,
and parameter counts drop by exactly the unit costs."""

import pytest
import torch

from conftest import tiny_model
from mop.models.adapters import adapter_for
from mop.models import count_params
from mop.pruning.surgery import prune_width, remove_layer, structural_copy

IDS = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def silence_units(model, adapter, groups, neurons):
    """Zero the residual contribution of the given KV groups' query heads (o_proj columns) and neurons."""
    shape = adapter.shape(model)
    with torch.no_grad():
        for layer, layer_groups, layer_neurons in zip(adapter.layers(model), groups, neurons):
            for g in layer_groups:
                cols = slice(g * shape.n_rep * shape.head_dim, (g + 1) * shape.n_rep * shape.head_dim)
                layer.self_attn.o_proj.weight[:, cols] = 0
            layer.mlp.down_proj.weight[:, layer_neurons] = 0


def test_pruning_silenced_units_keeps_logits(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    shape = adapter.shape(model)
    n = len(adapter.layers(model))
    groups = [[i % shape.kv_heads] for i in range(n)]  # a different group per layer
    neurons = [[0, 5 + i, shape.intermediate - 1] for i in range(n)]
    silence_units(model, adapter, groups, neurons)
    before, params = logits(model), count_params(model)
    prune_width(model, adapter, groups, neurons)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    assert count_params(model) == params - n * (shape.group_params + 3 * shape.neuron_params)
    new = adapter.shape(model)
    assert (new.kv_heads, new.n_rep, new.intermediate) == (shape.kv_heads - 1, shape.n_rep, shape.intermediate - 3)
    assert model.config.num_attention_heads == new.heads and model.config.intermediate_size == new.intermediate


def test_removing_an_identity_layer_keeps_logits(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    layer = adapter.layers(model)[2]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    before, params, expected = logits(model), count_params(model), sum(p.numel() for p in layer.parameters())
    remove_layer(model, adapter, 2)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    assert count_params(model) == params - expected
    assert model.config.num_hidden_layers == 5
    assert [l.self_attn.layer_idx for l in adapter.layers(model)] == list(range(5))


def test_generate_with_cache_after_pruning(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    remove_layer(model, adapter, 1)
    prune_width(model, adapter, [[0]] * 5, [[1, 2]] * 5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    cached = model.generate(IDS[:1], use_cache=True, **kwargs)
    uncached = model.generate(IDS[:1], use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_structural_copy_shares_weights_and_pruning_leaves_original_intact(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    before, params = logits(model), count_params(model)
    copy = structural_copy(model)
    assert copy.get_input_embeddings().weight is model.get_input_embeddings().weight
    prune_width(copy, adapter, [[0]] * 6, [[3]] * 6)
    remove_layer(copy, adapter, 0)
    assert count_params(model) == params and len(adapter.layers(model)) == 6
    assert torch.equal(logits(model), before)


def test_complement_is_the_sorted_kept_indices():
    from mop.pruning.surgery import complement

    assert complement([0, 2], 4).tolist() == [1, 3]
    assert complement([3, 1], 5).tolist() == [0, 2, 4]  # removed indices in any order
    assert complement([], 3).tolist() == [0, 1, 2]
    with pytest.raises(IndexError):
        complement([5], 4)
