"""`--tensor-parallel` / `--mlp-multiple`: width steps leave only shapes that vLLM can shard, on a model whose
unaligned plan breaks tensor parallelism."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import VOCAB, random_model
from mop.cli import main
from mop.models import count_params, load_model
from mop.models.adapters import LayerShape
from mop.pipeline import PipelineConfig
from mop.pruning.methods.llm_pruner import uniform_plan
from mop.pruning.search import Search, SearchConfig
from mop.pruning.width import Alignment, plan_width

SMALL = dict(calib_samples=8, calib_max_length=64)
TP, MULTIPLE = 4, 8  # MLP widths in blocks of 32 neurons
IDS = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))


def shardable(config: dict, devices: int, block: int) -> bool:
    """vLLM's rules, read off a saved config.json: query heads split evenly (ModelConfig), KV heads split evenly
    or replicated (QKVParallelLinear), the MLP split evenly (MergedColumnParallelLinear), in blocks."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    return (heads % devices == 0 and (kv % devices == 0 or devices % kv == 0)
            and config["intermediate_size"] % block == 0)


@pytest.fixture
def mha_dir(tokenizer, tmp_path):
    """8 heads of 8 on d=64 (MHA), an MLP of 256: one KV group costs less than a layer, so width steps take
    single groups (8 → 7 heads: not shardable over 4) and single neurons."""
    directory = tmp_path / "mha"
    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=8, head_dim=8,
                         intermediate_size=256, num_hidden_layers=6, tie_word_embeddings=False)
    random_model(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("kv", "n_rep", "ok"), [(8, 1, True), (7, 1, False), (6, 1, False), (4, 1, True),
                                                 (2, 2, True), (1, 4, True), (3, 4, False), (6, 2, False)])
def test_head_counts_follow_vllms_sharding_rules(kv, n_rep, ok):
    """Over 4 devices: 2 KV heads of 2 query heads each are replicated twice (4 % 2 == 0); 3 KV heads of 4 are
    neither split nor replicated evenly, nor are 6 KV heads of 2 (though their 12 query heads split)."""
    assert Alignment(4).kv_heads_ok(kv, n_rep) is ok


def test_aligned_plan_spends_whole_blocks_and_carries_the_rest():
    """One layer's budget is 1.2 blocks of 32 neurons per layer (attention never affords 4 of 8 groups): the
    aligned steps remove 1, 1, 2, 1, 1, 1, 1, 2 blocks, carrying the fraction, and never drift from the plan by
    more than half a block row."""
    shape = LayerShape(64, 8, 8, 1, 1024, qkv_bias=False, mlp_bias=False)
    units = Alignment(TP, MULTIPLE).units(shape, None)
    row = 32 * shape.neuron_params * 6
    budget = round(1.2 * row)
    carry = neuron_carry = 0.0
    planned = achieved = 0
    blocks = []
    for _ in range(8):
        plan = plan_width(shape, 6, budget, carry, units, neuron_carry)
        assert plan.neurons_per_layer % 32 == 0 and plan.groups_per_layer == 0
        blocks.append(plan.neurons_per_layer // 32)
        planned, achieved = planned + plan.planned, achieved + plan.achieved
        assert abs(achieved - planned) <= row / 2
        shape = plan.shape_after(shape)
        carry, neuron_carry = plan.carry_out, plan.neuron_carry_out
        assert not Alignment(TP, MULTIPLE).problems(shape)
    assert blocks == [1, 1, 2, 1, 1, 1, 1, 2]


def test_unaligned_width_pruning_breaks_tensor_parallel_and_aligned_does_not(mha_dir, tmp_path):
    free = Search(load_model(str(mha_dir)), SearchConfig(targets=[0.1, 0.2, 0.3], mode="width", **SMALL),
                  tmp_path / "free").run()
    configs = [json.loads((tmp_path / "free" / t / "config.json").read_text()) for t in free.targets]
    assert not all(shardable(c, TP, TP * MULTIPLE) for c in configs)  # the shapes this test is about

    loaded = load_model(str(mha_dir))
    config = SearchConfig(targets=[0.1, 0.2, 0.3], mode="width", tensor_parallel=TP, mlp_multiple=MULTIPLE, **SMALL)
    state = Search(loaded, config, tmp_path / "aligned").run()
    for name, reached in state.targets.items():
        saved = json.loads((tmp_path / "aligned" / name / "config.json").read_text())
        assert shardable(saved, TP, TP * MULTIPLE), saved
        assert reached["compression"] >= reached["target"]
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned" / name)
        assert count_params(reloaded) == reached["params"]
    for record in state.iterations:
        plan = record["width_plan"]
        assert plan["neurons_per_layer"] % 32 == 0 and plan["planned"] > 0 and plan["achieved"] > 0
    with torch.no_grad():  # the last checkpoint is the model the search holds
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned" / "target-30")
        torch.testing.assert_close(reloaded(IDS).logits, loaded.model(IDS).logits, atol=1e-5, rtol=0)


def test_an_aligned_search_extended_is_the_uninterrupted_one(mha_dir, tmp_path):
    """The MLP carry is restored on replay: 10% then 45% in one directory makes the same path as 45% at once."""
    aligned = dict(mode="width", tensor_parallel=TP, mlp_multiple=MULTIPLE, **SMALL)
    Search(load_model(str(mha_dir)), SearchConfig(targets=[0.1], **aligned), tmp_path / "a").run()
    extended = Search(load_model(str(mha_dir)), SearchConfig(targets=[0.1, 0.45], **aligned), tmp_path / "a").run()
    whole = Search(load_model(str(mha_dir)), SearchConfig(targets=[0.1, 0.45], **aligned), tmp_path / "b").run()

    def plans(state):
        return [(r["width_plan"], r["removed"]) for r in state.iterations]

    assert plans(extended) == plans(whole) and len(whole.iterations) >= 3
    assert any(r["width_plan"]["neuron_carry_out"] != 0 for r in whole.iterations)


def test_alignment_is_in_the_identity_only_when_asked():
    """Runs without alignment keep the identity they had before the option existed (their directories resume)."""
    assert "tensor_parallel" not in SearchConfig(targets=[0.2]).identity()
    assert SearchConfig(targets=[0.2], tensor_parallel=2).identity()["tensor_parallel"] == 2
    pipeline = PipelineConfig(search=SearchConfig(targets=[0.2])).identity()["search"]  # mop run / mop compare
    assert "mlp_multiple" not in pipeline and "targets" not in pipeline and "seed" not in pipeline
    assert PipelineConfig(search=SearchConfig(targets=[0.2], mlp_multiple=64)).identity()["search"]["mlp_multiple"] == 64


@pytest.mark.parametrize(("option", "message"), [
    (["--tensor-parallel", "4"], "6 query heads over 6 KV heads do not shard over 4 devices"),
    (["--mlp-multiple", "3"], "MLP width 128 is not a multiple of 3"),
])
@pytest.mark.parametrize("method", ["mop", "llm-pruner", "shortgpt"])
def test_a_model_that_does_not_start_aligned_is_refused_before_work(tiny_dirs, tmp_path, capsys, option, message,
                                                                     method):
    out = tmp_path / "out"
    code = main(["prune", str(tiny_dirs["llama-mha"]), "--out", str(out), "--target", "0.2", "--method", method,
                 *option])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_llm_pruner_plan_keeps_shardable_counts():
    """LLM-Pruner's uniform plan, by attention's share: 2 of 8 KV groups, leaving 6 (not shardable over 4).
    Aligned, the next shardable count (4) is more than due: no group goes and the MLP takes the budget in blocks."""
    shape = LayerShape(64, 8, 8, 1, 256, qkv_bias=False, mlp_bias=False)
    budget = 6 * (3 * shape.group_params + 50 * shape.neuron_params)
    free = uniform_plan(shape, 6, budget)
    aligned = uniform_plan(shape, 6, budget, Alignment(TP, MULTIPLE).units(shape, None))
    assert free.groups_per_layer == 2 and Alignment(TP).problems(free.shape_after(shape))
    assert aligned.groups_per_layer == 0 and aligned.neurons_per_layer == 96  # 2.56 blocks of 32: 3 blocks
    assert not Alignment(TP, MULTIPLE).problems(aligned.shape_after(shape))
