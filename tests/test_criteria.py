"""Layer and path criteria against independent computations: block influence from the hidden states that
transformers returns, cosine and KL from full logits of each text run alone, perplexity from cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from mop.data import collate
from mop.models.adapters import adapter_for
from mop.pruning.criteria import (block_influence, block_influences, build_reference, cosine_angle, kl_divergence,
                                  perplexity)
from mop.pruning.criteria import PathReference
from mop.pruning.surgery import remove_layer, structural_copy

PROMPTS = [[1, 17, 230, 45, 9, 301, 77], [1, 400, 12], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 88, 99, 101]]


def batches(size: int):
    return [collate(PROMPTS[i : i + size], pad_id=2) for i in range(0, len(PROMPTS), size)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_block_influence_is_one_minus_cosine_of_layer_input_and_output(batch_size):
    """Layer 2 of a tiny LLaMA is made nearly an identity (its residual branches scaled by 1e-3): it has the
    lowest 1 − cos and is chosen; the values match the hidden states of each prompt run alone."""
    model = tiny_model("llama-gqa")
    adapter = adapter_for(model)
    with torch.no_grad():
        for linear in (adapter.layers(model)[2].self_attn.o_proj, adapter.layers(model)[2].mlp.down_proj):
            linear.weight.mul_(1e-3)
    n = len(adapter.layers(model))
    expected = torch.zeros(n - 1, dtype=torch.float64)
    with torch.no_grad():
        for ids in PROMPTS:
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states  # n + 1 of [1, T, d]
            for i in range(n - 1):  # the last layer's output comes back normalised
                cos = F.cosine_similarity(hidden[i][0].double(), hidden[i + 1][0].double(), dim=-1)
                expected[i] += (1 - cos).mean() / len(PROMPTS)
    influences = block_influences(model, adapter, batches(batch_size))
    torch.testing.assert_close(influences[: n - 1], expected, rtol=1e-4, atol=1e-7)
    assert int(expected[: n - 2].argmin()) == 2 == block_influence(model, adapter, batches(batch_size))


def test_block_influence_never_picks_the_last_two_layers():
    model = tiny_model("mistral")
    adapter = adapter_for(model)
    with torch.no_grad():
        for layer in adapter.layers(model)[-2:]:  # the most redundant layers, but they must stay
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    influences = block_influences(model, adapter, batches(2))
    assert influences[-2:].max() < 1e-6 < influences[:-2].min()
    assert block_influence(model, adapter, batches(2)) == int(influences[:-2].argmin())


@pytest.fixture
def pair():
    """A tiny model F, a candidate (F without layer 1, sharing its weights), and F's reference on the prompts."""
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    candidate = structural_copy(model)
    remove_layer(candidate, adapter, 1)
    return model, candidate, adapter, build_reference(model, adapter, batches(3), [])


def full_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()  # [T, V]


def test_cosine_is_the_angle_between_flattened_logits(pair):
    model, candidate, adapter, reference = pair
    ref = torch.cat([full_logits(model, ids).flatten() for ids in PROMPTS])
    cand = torch.cat([full_logits(candidate, ids).flatten() for ids in PROMPTS])
    expected = math.acos((ref @ cand / (ref.norm() * cand.norm())).item())
    assert expected > 0.05
    assert cosine_angle(candidate, adapter, reference) == pytest.approx(expected, rel=1e-5)
    assert cosine_angle(model, adapter, reference) == pytest.approx(0, abs=1e-3)  # acos near 1 is steep


def test_kl_is_the_mean_over_positions(pair):
    model, candidate, adapter, reference = pair
    total = sum(F.kl_div(F.log_softmax(full_logits(candidate, ids), -1), F.log_softmax(full_logits(model, ids), -1),
                         log_target=True, reduction="sum").item() for ids in PROMPTS)
    expected = total / sum(len(ids) for ids in PROMPTS)
    assert expected > 1e-3
    assert kl_divergence(candidate, adapter, reference) == pytest.approx(expected, rel=1e-4)  # float32 log-softmax


def test_ppl_is_exp_of_the_mean_next_token_nll(pair):
    model, candidate, adapter, _ = pair
    segments = [torch.randint(3, 500, (17,), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    reference = PathReference(segments=segments)
    nll = sum(F.cross_entropy(full_logits(candidate, s.tolist())[:-1], s[1:], reduction="sum").item() for s in segments)
    expected = math.exp(nll / (3 * 16))
    assert perplexity(candidate, adapter, reference) == pytest.approx(expected, rel=1e-5)
    assert perplexity(candidate, adapter, reference) != pytest.approx(perplexity(model, adapter, reference), rel=1e-3)
