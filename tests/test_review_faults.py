"""The faults a close read of the code found (issue 29, item 7), each pinned by a test that fails without its fix."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import SHARED_DATA
from mop import data


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A LLaMA-2-like tokenizer: BPE over "▁"-marked words, "▁" prepended to the text, <s> first."""
    rows = json.loads((SHARED_DATA / "alpaca" / "alpaca_en_demo.json").read_text())[:200]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.train_from_iterator([r["instruction"] + "\n" + r["output"] for r in rows],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def test_sft_rows_are_the_joined_text_with_the_prompt_masked(sentencepiece_tokenizer):
    """The learned tokens are those of prompt + response tokenized together: no word-start "▁" on the first
    response token, which the response tokenized on its own would have."""
    tokenizer = sentencepiece_tokenizer
    prompt = data.alpaca_prompt({"instruction": "Say yes."})
    response = "The answer is yes."
    assert tokenizer.convert_ids_to_tokens(tokenizer(response, add_special_tokens=False)["input_ids"])[0] == "▁The"
    (ids, labels), = data.sft_rows(tokenizer, [data.Example(prompt, response)], 512)
    joined = tokenizer(prompt + response)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert ids == joined + [tokenizer.eos_token_id]
    assert labels == [data.IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]
    assert tokenizer.convert_ids_to_tokens(labels[len(prompt_ids)]) == "The"
    assert tokenizer.decode(ids[len(prompt_ids):-1]) == response


WIKI_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"


def test_a_wikitext_file_follows_the_standard_protocol(tiny_dirs, smollm2_dir, tmp_path):
    """`--task-file wikitext=wiki.test.raw` scores the text the named set scores (blank rows kept: 148 segments
    of 2048 SmolLM2 tokens, not 147), as does the split as Hugging Face rows in jsonl."""
    from mop.evaluation import evaluate
    from mop.models import load_model

    rows = data.wikitext_rows(WIKI_TEST.read_text(encoding="utf-8"))
    jsonl = tmp_path / "wikitext.jsonl"
    jsonl.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    standard = data.perplexity_text("wikitext2")
    assert data.perplexity_text(str(WIKI_TEST), wikitext=True) == standard
    assert data.perplexity_text(str(jsonl), wikitext=True) == standard
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    named = evaluate(loaded, ["wikitext"], ppl_segment_length=64, ppl_segments=2)["tasks"]["wikitext"]
    for path in (WIKI_TEST, jsonl):
        record = evaluate(loaded, ["wikitext"], ppl_segment_length=64, ppl_segments=2,
                          task_files={"wikitext": path})["tasks"]["wikitext"]
        assert record["perplexity"] == named["perplexity"] and record["protocol"] == named["protocol"]
    smollm2 = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(data.text_segments(smollm2, data.perplexity_text(str(WIKI_TEST), wikitext=True), 2048)) == 148


def test_a_wikitext_file_without_blank_rows_is_refused_in_one_line(tiny_dirs, tmp_path, capsys):
    """A text with its blank rows dropped is not the split: `mop eval` says so before loading the model."""
    from mop.cli import main

    cleaned = tmp_path / "cleaned.raw"
    cleaned.write_text("".join(line + "\n" for line in WIKI_TEST.read_text().splitlines()[:200] if line.strip()))
    out = tmp_path / "out" / "eval.json"
    assert main(["eval", str(tiny_dirs["llama-gqa"]), "--tasks", "wikitext", "--task-file", f"wikitext={cleaned}",
                 "--output", str(out)]) == 2
    error = capsys.readouterr().err
    assert "has no blank row, so it is not a WikiText split" in error and "Traceback" not in error
    assert not out.exists()


def _row(average: float, perplexity: float, stderr: float | None) -> dict:
    return {"average": average, "perplexity": perplexity, "tasks": {"piqa": average}, "stderr": {"piqa": stderr}}


def test_a_missing_standard_error_gives_no_verdict():
    """+1.0 point with no standard error on one side is not "yes: better" (an unknown error is not 0)."""
    from mop.report import _differences

    method = lambda average, stderr: {"checkpoints": {"target-20": {0: _row(average, 30, stderr)}}}
    lines = _differences({"mop": method(0.50, None), "other": method(0.51, None)}, "target-20", ["piqa"], "mop")
    assert "| other | +1.0 | – | 0.0 | unknown (no standard error) |" in lines
    lines = _differences({"mop": method(0.50, 0.01), "other": method(0.51, None), "known": method(0.60, 0.01)},
                         "target-20", ["piqa"], "mop")
    assert "| other | +1.0 | – | 0.0 | unknown (no standard error) |" in lines
    assert "| known | +10.0 | 2.8 | 0.0 | yes: better |" in lines


def test_the_worst_seed_cell_is_one_seed():
    """Seed 0 has the lowest average, seed 1 the highest perplexity: the cell is seed 0's average and
    perplexity."""
    from mop.report import _worst

    assert _worst([_row(0.40, 30.0, 0.01), _row(0.45, 50.0, 0.01)]) == "40.0 / 30.00"
    assert _worst([_row(None, 30.0, None), _row(None, 50.0, None)]) == "– / 50.00"


def test_compare_dense_latency_is_timed_beside_every_method():
    """The study's records: the dense latency is the mean baseline of every method's timed checkpoints, not
    those of the last method in the directory."""
    from mop.report import collect_comparison

    study = Path(__file__).resolve().parents[1] / "docs" / "study" / "smollm2"
    baselines = [json.loads(path.read_text())["models"]["baseline"]["end_to_end_s"]["mean"]
                 for path in study.glob("*/seed-*/bench/target-*.json") if not path.name.endswith(".vllm.json")]
    results = collect_comparison(study)
    last = max(results["methods"])  # methods are read in directory order
    last_baselines = [r["baseline_latency_s"] for per_seed in results["methods"][last]["checkpoints"].values()
                      for r in per_seed.values() if "latency_s" in r]
    assert len(baselines) > len(last_baselines) > 0
    assert results["dense"]["latency_s"] == pytest.approx(sum(baselines) / len(baselines))


def test_llm_pruner_plan_takes_what_the_capped_mlp_cannot_from_attention():
    """An attention-heavy shape under tensor parallelism 4 (8 KV groups of 2 heads: a layer may keep 2, 4 or 8
    groups): the nearest allowed count below attention's share is 0 groups, the MLP alone cannot take the
    budget, so attention takes 4 groups; before, the plan removed 0.62 of its budget."""
    from mop.models.adapters import LayerShape
    from mop.pruning.methods.llm_pruner import uniform_plan
    from mop.pruning.width import Alignment

    shape = LayerShape(hidden=64, head_dim=16, kv_heads=8, n_rep=2, intermediate=64, qkv_bias=False, mlp_bias=False)
    units = Alignment(tensor_parallel=4).units(shape, None)
    budget = round(0.3 * 6 * (shape.attention_params + shape.mlp_params))
    plan = uniform_plan(shape, 6, budget, units)
    assert (plan.groups_per_layer, plan.neurons_per_layer) == (4, 0) and plan.achieved >= budget
    for fraction in (0.05, 0.1, 0.2, 0.4):  # every reachable budget is met
        budget = round(fraction * 6 * (shape.attention_params + shape.mlp_params))
        assert uniform_plan(shape, 6, budget, units).achieved >= budget


def test_a_peer_cut_short_of_its_goal_is_refused_before_its_checkpoint(tiny_dirs, tmp_path, monkeypatch):
    """Every one-shot method's cut is checked against the goal: one that falls short writes no checkpoint."""
    from mop.errors import MopError
    from mop.models import load_model
    from mop.pruning import methods
    from mop.pruning.methods.shortgpt import ShortGPT
    from mop.pruning.search import SearchConfig

    monkeypatch.setattr(ShortGPT, "cut", lambda self, model, scores, target, state: [])  # removes nothing
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    config = SearchConfig(targets=[0.3], method="shortgpt", calib_samples=4, calib_max_length=32)
    with pytest.raises(MopError, match="shortgpt cannot reach target 0.3 .* above the goal"):
        methods.prune(loaded, config, tmp_path / "out")
    assert not (tmp_path / "out" / "target-30").exists()


def test_width_step_takes_from_attention_what_the_capped_mlp_cannot():
    """Late in a search (3 layers of 2 KV groups and 16 neurons), the MLP down to one neuron takes 0.56 of a
    layer's parameters; a KV group out of every layer brings the width candidate nearer the depth candidate's
    size (1.19×), so it is taken, and the group taken beyond attention's due share is carried as a debt."""
    from mop.models.adapters import LayerShape
    from mop.pruning.width import plan_width

    shape = LayerShape(hidden=64, head_dim=16, kv_heads=2, n_rep=2, intermediate=16, qkv_bias=False, mlp_bias=False)
    layer = 2 * shape.hidden + shape.attention_params + shape.mlp_params
    plan = plan_width(shape, 3, layer, 0.0)
    assert (plan.groups_per_layer, plan.neurons_per_layer) == (1, 0)
    assert plan.achieved / layer == pytest.approx(1.19, abs=0.005) and plan.carry_out < 0


def test_qwen2_max_window_layers_follows_removed_layers():
    """Layers below `max_window_layers` use full attention: removing one of them lowers it by one, so a consumer
    that derives the sliding layers from it (vLLM, a config without `layer_types`) gets the kept layers' own."""
    from transformers import Qwen2Config

    from conftest import random_model
    from mop.models import adapter_for
    from mop.pruning.surgery import remove_layer

    model = random_model(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     intermediate_size=96, num_hidden_layers=6, use_sliding_window=True,
                                     sliding_window=16, max_window_layers=3))
    adapter = adapter_for(model)
    remove_layer(model, adapter, 1)  # a full-attention layer
    remove_layer(model, adapter, 3)  # a sliding one (originally layer 4)
    config = adapter.export_config(model)
    assert config.max_window_layers == 2
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    derived = Qwen2Config(**{k: v for k, v in config.to_dict().items() if k != "layer_types"})
    assert derived.layer_types == config.layer_types


def test_targets_that_share_a_directory_are_refused(tiny_dirs, tmp_path, capsys):
    """0.2 and 0.205 would both write target-20: `mop prune` refuses them in one line, before any work."""
    from mop.cli import main
    from mop.errors import MopError
    from mop.pruning.search import SearchConfig

    with pytest.raises(MopError, match="share a checkpoint directory"):
        SearchConfig(targets=[0.2, 0.205]).validate()
    SearchConfig(targets=[0.2, 0.2, 0.21]).validate()  # the same target twice is one target
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dirs["llama-gqa"]), "--target", "0.2", "--target", "0.205", "--out", str(out)]) == 2
    assert "targets 0.2, 0.205 share a checkpoint directory (target-20)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("method", ["mop", "shortgpt"])
def test_a_resumed_run_records_the_versions_of_the_session_that_wrote_each_checkpoint(method, tiny_dirs, tmp_path,
                                                                                     monkeypatch):
    """A target added in a later session with other libraries: its mop.json has that session's versions, and
    the first session's as `run_versions`; the first checkpoint keeps its own."""
    from mop import provenance
    from mop.models import load_model
    from mop.pruning import methods, search
    from mop.pruning.methods import oneshot
    from mop.pruning.search import SearchConfig

    first = provenance.versions()
    settings = dict(method=method, mode="depth", calib_samples=4, calib_max_length=32)
    methods.prune(load_model(str(tiny_dirs["llama-gqa"])), SearchConfig(targets=[0.2], **settings), tmp_path)
    later = {**first, "torch": "9.9.9"}
    monkeypatch.setattr(search, "versions", lambda: later)
    monkeypatch.setattr(oneshot, "versions", lambda: later)
    methods.prune(load_model(str(tiny_dirs["llama-gqa"])), SearchConfig(targets=[0.2, 0.4], **settings), tmp_path)
    earlier, added = (json.loads((tmp_path / name / "mop.json").read_text()) for name in ("target-20", "target-40"))
    assert earlier["versions"] == earlier["run_versions"] == first
    assert added["versions"] == later and added["run_versions"] == first


def test_weight_decay_is_an_explicit_option(tiny_dirs, monkeypatch):
    """AdamW's weight decay is a training setting (0.01 by default, left out of run identities so that runs made
    before it resume; the reference recipe's 0 on request) that reaches the optimizer."""
    import torch

    from mop.cli import _pipeline_config, build_parser
    from mop.models import load_model
    from mop.training import LoraSettings, lora, loop

    parser, model = build_parser(), str(tiny_dirs["llama-gqa"])
    assert LoraSettings().weight_decay == 0.01
    config = _pipeline_config(parser.parse_args(["run", model, "--target", "0.2", "--out", "o"]))
    assert config.recovery.lora.weight_decay == 0.01 and "weight_decay" not in json.dumps(config.identity())
    config = _pipeline_config(parser.parse_args(["run", model, "--target", "0.2", "--out", "o",
                                                 "--recovery-weight-decay", "0"]))
    assert config.recovery.lora.weight_decay == 0 and config.identity()["recovery"]["lora"]["weight_decay"] == 0
    assert parser.parse_args(["finetune", "m", "--out", "o", "--weight-decay", "0"]).weight_decay == 0

    decays = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **options: decays.append(options["weight_decay"])
                        or adamw(params, **options))
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    rows = data.sft_rows(loaded.tokenizer, [data.Example("Say:", " yes")], 64)
    for decay in (0.0, 0.1):
        settings = LoraSettings(rank=2, batch_size=1, micro_batch_size=1, max_length=64, weight_decay=decay,
                                activation_checkpointing=False)
        with lora.lora_attached(loaded.model, settings, 0) as peft_model:
            loop.train(peft_model, rows, settings, 1, 0, loaded.tokenizer.pad_token_id)
    assert decays == [0.0, 0.1]
