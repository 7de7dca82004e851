"""Settings that a pruned checkpoint must carry to compute what the pruned model computed: LLaMA-3 rope scaling
through the LLaMA→Mistral export, Qwen2's per-layer sliding window after a depth step, and LLaMA attention
biases, which have no Mistral twin, so the planner keeps their head counts dividing hidden_size."""

import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from conftest import VOCAB, random_model
from mop.models import count_params, load_model
from mop.models.adapters import LayerShape
from mop.pruning.search import Search, SearchConfig
from mop.pruning.width import WidthUnits, plan_width

SMALL = dict(calib_samples=8, calib_max_length=64)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}


def save_tiny(config, tokenizer, directory):
    random_model(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, VOCAB, (2, 120), generator=torch.Generator().manual_seed(3))  # beyond 32 and 8 positions


def test_llama3_rope_scaling_survives_the_mistral_export(tokenizer, tmp_path):
    """5 heads of 16 on d=96 are written as Mistral; its rope must stay LLaMA-3's, bit for bit in the logits."""
    config = LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, head_dim=16,
                         intermediate_size=128, num_hidden_layers=4, max_position_embeddings=256,
                         rope_parameters=dict(LLAMA3_ROPE))
    loaded = load_model(str(save_tiny(config, tokenizer, tmp_path / "llama3")))
    Search(loaded, SearchConfig(targets=[0.1], mode="width", **SMALL), tmp_path / "out").run()
    checkpoint = tmp_path / "out" / "target-10"
    saved = AutoConfig.from_pretrained(checkpoint)
    assert saved.model_type == "mistral" and 96 % saved.num_attention_heads != 0
    assert saved.rope_parameters == LLAMA3_ROPE
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert torch.equal(logits(reloaded, IDS), logits(loaded.model, IDS))
    # the scaling matters at these positions: without it the same weights compute something else
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0})
    assert not torch.allclose(logits(plain, IDS)[:, 40:], logits(reloaded, IDS)[:, 40:], atol=1e-3)


def test_qwen2_sliding_window_layers_after_a_depth_step(tokenizer, tmp_path):
    """Layers 4 and 5 of 6 slide (max_window_layers=4); removing layer 3 leaves F F F S S, which the checkpoint
    states per layer and by max_window_layers, now 3 (left at 4 it would give F F F F S to whoever derives the
    layer types from it)."""
    config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=96, num_hidden_layers=6, use_sliding_window=True, sliding_window=8,
                         max_window_layers=4, tie_word_embeddings=True)
    loaded = load_model(str(save_tiny(config, tokenizer, tmp_path / "qwen2")))
    assert loaded.model.config.layer_types == ["full_attention"] * 4 + ["sliding_attention"] * 2
    Search(loaded, SearchConfig(targets=[0.1], mode="depth", **SMALL), tmp_path / "out").run()
    checkpoint = tmp_path / "out" / "target-10"
    provenance = json.loads((checkpoint / "mop.json").read_text())
    assert [r["layer"] for r in provenance["iterations"]] == [3]
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert reloaded.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 2
    assert reloaded.config.sliding_window == 8 and reloaded.config.use_sliding_window
    assert torch.equal(logits(reloaded, IDS), logits(loaded.model, IDS))
    settings = json.loads((checkpoint / "config.json").read_text())
    assert settings["max_window_layers"] == 3
    del settings["layer_types"]  # then Qwen2Config derives them from max_window_layers: the same ones
    by_index = AutoModelForCausalLM.from_pretrained(checkpoint, config=Qwen2Config.from_dict(settings))
    assert by_index.config.layer_types == reloaded.config.layer_types
    assert torch.equal(logits(by_index, IDS), logits(reloaded, IDS))


def biased_llama(tokenizer, directory):
    """6 heads of 16 on d=96 with attention biases: 5 heads would not divide 96 and cannot be exported."""
    config = LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, head_dim=16,
                         intermediate_size=128, num_hidden_layers=6, attention_bias=True, tie_word_embeddings=False)
    return save_tiny(config, tokenizer, directory)


def test_planner_leaves_only_exportable_head_counts():
    """8 heads of 16 on d=128 with biases may become 4, 2 or 1 heads: 5 due groups are spent as 4, 1 is carried."""
    shape = LayerShape(128, 16, 8, 1, 64, qkv_bias=True, mlp_bias=False)
    budget = 5 * 2 * shape.group_params  # 5 groups out of 2 layers fit
    free = plan_width(shape, 2, budget, carry=5.0)
    kept = plan_width(shape, 2, budget, carry=5.0, units=WidthUnits(kv_counts=frozenset({1, 2, 4, 8})))
    assert (free.groups_per_layer, kept.groups_per_layer) == (5, 4)
    assert kept.carry_out == free.carry_out + 1
    assert abs(kept.achieved - budget) < 2 * shape.neuron_params  # the MLP takes what attention leaves
    assert kept.neurons_per_layer > free.neurons_per_layer


def test_llama_with_biases_never_gets_an_unexportable_head_count(tokenizer, tmp_path):
    """Width mode: one group is due at the first steps and two never fit, so the head count stays 6 (5 cannot be
    exported); the checkpoint loads as LLaMA with the same logits. Mixture mode to 60%: once depth steps have
    made groups affordable, heads go from 6 to a count that divides 96."""
    directory = biased_llama(tokenizer, tmp_path / "biased")
    loaded = load_model(str(directory))
    Search(loaded, SearchConfig(targets=[0.15], mode="width", **SMALL), tmp_path / "width").run()
    assert loaded.adapter.kv_head_counts(loaded.model) == {1, 2, 3, 4, 6}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "width" / "target-15")
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.num_attention_heads == 6
    torch.testing.assert_close(logits(reloaded, IDS), logits(loaded.model, IDS), atol=1e-5, rtol=0)

    loaded = load_model(str(directory))
    state = Search(loaded, SearchConfig(targets=[0.6], seed=0, **SMALL), tmp_path / "mop").run()
    assert "".join(r["choice"] for r in state.iterations) == "DDWDW"
    assert [r["width_plan"]["groups_per_layer"] for r in state.iterations if r["choice"] == "W"] == [0, 3]
    assert loaded.adapter.shape(loaded.model).heads == 3  # 6 → 3: the 3 due groups fit 4 layers' budget
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mop" / "target-60")
    torch.testing.assert_close(logits(reloaded, IDS), logits(loaded.model, IDS), atol=1e-5, rtol=0)
    assert count_params(reloaded) == count_params(loaded.model)
