"""The search tunes and scores its width candidate as masks over F^(t-1) (`masked_width`): it must compute
what the physically pruned model computes, with and without LoRA adapters wrapped around the projections."""

import torch

from conftest import tiny_model
from mop.models.adapters import adapter_for
from mop.pruning.surgery import masked_width, prune_width, structural_copy
from mop.training import LoraSettings, lora_attached


def _removed(model, adapter, seed: int):
    shape, layers = adapter.shape(model), len(adapter.layers(model))
    generator = torch.Generator().manual_seed(seed)
    groups = [sorted(torch.randperm(shape.kv_heads, generator=generator)[: 1 + i % 2].tolist()) for i in range(layers)]
    neurons = [sorted(torch.randperm(shape.intermediate, generator=generator)[: 3 + i].tolist()) for i in range(layers)]
    groups[0] = []  # a layer that keeps every group
    return groups, neurons


def test_masked_width_computes_the_pruned_model(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    groups, neurons = _removed(model, adapter, 0)
    pruned = structural_copy(model)
    prune_width(pruned, adapter, groups, neurons)
    with torch.no_grad():
        expected = pruned(ids).logits
        dense = model(ids).logits
        with masked_width(model, adapter, groups, neurons):
            masked = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(dense, expected, atol=1e-3)  # the masks do something
    torch.testing.assert_close(after, dense, atol=0, rtol=0)  # and leave nothing behind


def test_masks_entered_after_lora_cover_the_adapters(family):
    """Masks entered after LoRA wraps the projections mask the adapters too: the removed units get no gradient."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    groups, neurons = _removed(model, adapter, 1)
    settings = LoraSettings(rank=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with lora_attached(model, settings, 0) as peft_model, masked_width(model, adapter, groups, neurons):
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)  # B starts at zero; make the adapters matter
        peft_model.train()
        peft_model(input_ids=ids).logits.square().sum().backward()
        shape = adapter.shape(model)
        for index, layer in enumerate(adapter.layers(model)):
            o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
            cols = torch.tensor([h * shape.head_dim + d for g in groups[index]
                                 for h in range(g * shape.n_rep, (g + 1) * shape.n_rep) for d in range(shape.head_dim)],
                                dtype=torch.long)
            if len(cols):  # o_proj's LoRA A columns of the removed query heads see only zeros
                assert o_proj.lora_A["default"].weight.grad[:, cols].abs().max() == 0
            # up_proj's LoRA B rows of the removed neurons feed only zeroed down_proj inputs
            assert layer.mlp.up_proj.lora_B["default"].weight.grad[neurons[index]].abs().max() == 0
            assert down_proj.lora_A["default"].weight.grad[:, neurons[index]].abs().max() == 0
    assert not any("lora" in name for name, _ in model.named_parameters())  # unloaded
