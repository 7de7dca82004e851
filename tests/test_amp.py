"""AMP scores equal SPEC §1 computed independently: per prompt, without padding, one head at a time."""

import pytest
import torch

from conftest import tiny_model
from mop.models.adapters import adapter_for
from mop.pruning.criteria import amp
from mop.data import collate

PROMPTS = [[1, 17, 230, 45, 9, 301, 77], [1, 400, 12], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]


def reference_scores(model, adapter, prompts):
    """Head h: mean over the prompt's tokens of ‖W_o[:, h] z_t^(h)‖₁; neuron j: mean of |down_proj input_j|;
    each averaged per prompt (run alone, no padding), then over prompts; a group is the mean of its heads."""
    shape = adapter.shape(model)
    layers = adapter.layers(model)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, key=key: inputs.__setitem__(key, args[0][0]))
             for i, layer in enumerate(layers)
             for key, m in (((i, "o"), layer.self_attn.o_proj), ((i, "down"), layer.mlp.down_proj))]
    heads = torch.zeros(len(layers), shape.heads, dtype=torch.float64)
    neurons = torch.zeros(len(layers), shape.intermediate, dtype=torch.float64)
    with torch.no_grad():
        for ids in prompts:
            model(input_ids=torch.tensor([ids]))
            for i, layer in enumerate(layers):
                z, w = inputs[i, "o"].double(), layer.self_attn.o_proj.weight.double()  # [T, H·d_h], [d, H·d_h]
                for h in range(shape.heads):
                    cols = slice(h * shape.head_dim, (h + 1) * shape.head_dim)
                    heads[i, h] += (z[:, cols] @ w[:, cols].T).abs().sum(-1).mean() / len(prompts)
                neurons[i] += inputs[i, "down"].double().abs().mean(0) / len(prompts)
    for hook in hooks:
        hook.remove()
    return heads.view(len(layers), shape.kv_heads, shape.n_rep).mean(-1), neurons


@pytest.mark.parametrize("batch_size", [1, 3])
def test_amp_matches_the_definition(family, batch_size):
    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = [collate(PROMPTS[i : i + batch_size], pad_id=2) for i in range(0, len(PROMPTS), batch_size)]
    scores = amp(model, adapter, batches)
    groups, neurons = reference_scores(model, adapter, PROMPTS)
    for layer, layer_scores in enumerate(scores):
        torch.testing.assert_close(layer_scores.groups, groups[layer], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer_scores.neurons, neurons[layer], rtol=1e-4, atol=1e-6)
