"""The model card (README.md) of every checkpoint: `ModelCard.load` reads it, its metadata and text say what
`mop.json` and the config say, and its `model-index` results are the numbers of `results.json` and the eval
records — only for the weights they were measured on."""

import json
import shlex

import pytest
from huggingface_hub import ModelCard
from transformers import AutoConfig, LlamaConfig

from mop.cli import main
from mop.modelcard import add_results, base_model, card
from mop.models import load_model
from mop.pruning import methods
from mop.pruning.search import SearchConfig

CALIB = ["--calib-samples", "4", "--calib-max-length", "32"]
METHODS = {  # CLI options → the method tag
    "mop": ([], "mop"), "width": (["--mode", "width"], "mop-width"), "depth": (["--mode", "depth"], "mop-depth"),
    "shortgpt": (["--method", "shortgpt"], "shortgpt"), "llm-pruner": (["--method", "llm-pruner"], "llm-pruner"),
}


def assert_card_says(directory, provenance: dict, method: str, command: str | None) -> ModelCard:
    """The card's metadata and text against mop.json and config.json."""
    model_card = ModelCard.load(directory / "README.md")
    data, text = model_card.data, model_card.text
    assert data.base_model == base_model(provenance["source"]["name"])
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-generation")
    assert {"pruned", "mop", method} <= set(data.tags)
    assert f"Path**: `{provenance['path']}`" in text
    assert f"{100 * provenance['compression']:.2f}% of all parameters" in text
    assert f"{100 * provenance['non_embedding_compression']:.2f}% of the non-embedding parameters" in text
    assert f"{provenance['params']:,} parameters left of {provenance['original_params']:,}" in text
    config = AutoConfig.from_pretrained(directory)
    assert (f"{config.num_hidden_layers} layers, {config.num_attention_heads} attention heads, "
            f"{config.num_key_value_heads} KV heads, MLP width {config.intermediate_size}") in text
    assert "4 texts of `alpaca`, at most 32 tokens each" in text
    assert provenance["command"] == command
    assert (command in text) if command else "no command line was recorded" in text
    assert f'checkpoint = "path/to/{directory.name}"' in text and f"vllm serve path/to/{directory.name}" in text
    return model_card


@pytest.mark.parametrize("method", sorted(METHODS))
def test_prune_writes_a_card_of_its_checkpoint(method, tiny_dirs, tmp_path):
    out = tmp_path / "run"
    argv = ["prune", str(tiny_dirs["llama-gqa"]), "--target", "0.2", "--out", str(out), *CALIB, *METHODS[method][0]]
    assert main(argv) == 0
    provenance = json.loads((out / "target-20" / "mop.json").read_text())
    model_card = assert_card_says(out / "target-20", provenance, METHODS[method][1], shlex.join(["mop", *argv]))
    assert model_card.data.base_model == "llama-gqa"  # a local model: its directory name
    assert model_card.data.eval_results is None and "Not measured yet" in model_card.text


def test_a_python_api_checkpoint_says_it_has_no_command(tiny_dirs, tmp_path):
    loaded = load_model(str(tiny_dirs["qwen2"]))
    methods.prune(loaded, SearchConfig(targets=[0.2], calib_samples=4, calib_max_length=32, mode="width"), tmp_path)
    provenance = json.loads((tmp_path / "target-20" / "mop.json").read_text())
    assert_card_says(tmp_path / "target-20", provenance, "mop-width", None)


def test_base_model_is_the_hub_id_or_the_directory_name(tmp_path):
    assert base_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert base_model(str(tmp_path / "models" / "llama")) == "llama"


def test_compensation_is_named_when_mop_json_has_one(tiny_dirs, tmp_path):
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    methods.prune(loaded, SearchConfig(targets=[0.2], calib_samples=4, calib_max_length=32), tmp_path)
    provenance = json.loads((tmp_path / "target-20" / "mop.json").read_text())
    config = AutoConfig.from_pretrained(tmp_path / "target-20")
    assert "Compensation" not in card(provenance, config, "target-20").text
    with_compensation = card({**provenance, "compensation": {"method": "least-squares", "errors": [0.1]}}, config, "x")
    assert "**Compensation**: `least-squares`" in with_compensation.text


def test_run_cards_hold_the_measured_results_of_their_own_weights(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    argv = ["run", str(tiny_dirs["llama-gqa"]), "--target", "0.2", *CALIB, "--recovery-steps", "1",
            "--recovery-batch-size", "2", "--recovery-micro-batch-size", "2", "--recovery-max-length", "128",
            "--tasks", "arc_easy,winogrande,wikitext", "--eval-limit", "4", "--eval-ppl-segment-length", "64",
            "--bench-runs", "3", "--bench-warmup", "1", "--bench-no-generate", "--out", str(out)]
    assert main(argv) == 0
    recovered, pruned = out / "seed-0" / "recovered" / "target-20", out / "seed-0" / "prune" / "target-20"
    provenance = json.loads((recovered / "mop.json").read_text())
    model_card = assert_card_says(recovered, provenance, "mop", shlex.join(["mop", *argv]))
    assert f"LoRA sft, 1 steps of 2 examples of at most 128 tokens from `alpaca`" in model_card.text
    assert provenance["finetune"]["command"] == provenance["command"]

    row = json.loads((out / "results.json").read_text())["checkpoints"]["target-20"]["0"]
    evaluation = json.loads((out / "seed-0" / "eval" / "target-20.json").read_text())
    results = {(r.dataset_type, r.metric_type): r for r in model_card.data.eval_results}
    assert set(results) == {("allenai/ai2_arc", "acc_norm"), ("allenai/winogrande", "acc"),
                            ("wikitext", "perplexity"), ("mop-latency-prompt", "speedup")}
    arc, winogrande = results["allenai/ai2_arc", "acc_norm"], results["allenai/winogrande", "acc"]
    assert (arc.metric_value, arc.dataset_config, arc.dataset_args["documents"]) == (row["tasks"]["arc_easy"],
                                                                                      "ARC-Easy", 4)
    assert (winogrande.metric_value, winogrande.dataset_args["documents"]) == (row["tasks"]["winogrande"], 4)
    perplexity = results["wikitext", "perplexity"]
    assert perplexity.metric_value == row["perplexity"]
    assert perplexity.dataset_args["segments"] == evaluation["tasks"]["wikitext"]["segments"]
    assert perplexity.dataset_args["protocol"] == evaluation["tasks"]["wikitext"]["protocol"]
    speedup = results["mop-latency-prompt", "speedup"]
    assert (speedup.metric_value, speedup.dataset_args["runs_kept"]) == (row["speedup"], 2)
    assert f"| arc_easy | ARC-Easy | length-normalized accuracy | {100 * row['tasks']['arc_easy']:.2f}% |" in \
        model_card.text
    # the pruned checkpoint was not measured (its recovered successor was): no numbers in its card
    assert ModelCard.load(pruned / "README.md").data.eval_results is None

    # mop eval adds a task and replaces the perplexity; the speedup measured before stays
    output = tmp_path / "eval.json"
    assert main(["eval", str(recovered), "--tasks", "piqa,wikitext", "--limit", "2", "--ppl-segment-length", "64",
                 "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    results = {(r.dataset_type, r.metric_type): r for r in ModelCard.load(recovered / "README.md").data.eval_results}
    assert results["baber/piqa", "acc_norm"].metric_value == record["tasks"]["piqa"]["acc_norm"]
    assert results["wikitext", "perplexity"].metric_value == record["tasks"]["wikitext"]["perplexity"]
    assert results["wikitext", "perplexity"].dataset_args["segments"] == 2
    assert results["mop-latency-prompt", "speedup"].metric_value == row["speedup"]

    # a record of other weights is never added
    before = (pruned / "README.md").read_text()
    add_results(pruned, record["model"]["weights_sha256"].replace("a", "b"), evaluation=record)
    assert (pruned / "README.md").read_text() == before


def test_finetune_of_a_model_mop_did_not_prune(tiny_dirs, tmp_path):
    out = tmp_path / "tuned"
    argv = ["finetune", str(tiny_dirs["mistral"]), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
            "--micro-batch-size", "2", "--max-length", "128"]
    assert main(argv) == 0
    model_card = ModelCard.load(out / "README.md")
    assert model_card.data.base_model == "mistral" and "pruned" not in model_card.data.tags
    assert "not pruned by mop" in model_card.text and shlex.join(["mop", *argv]) in model_card.text


def test_llava_card(tmp_path):
    from test_llava import TEXT, build_llava

    from conftest import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    llava = build_llava(tmp_path / "llava", LlamaConfig(**TEXT, vocab_size=len(tokenizer)), tokenizer)
    assert main(["prune", str(llava), "--target", "0.2", "--out", str(tmp_path / "run"), *CALIB]) == 0
    directory = tmp_path / "run" / "target-20"
    provenance = json.loads((directory / "mop.json").read_text())
    model_card = ModelCard.load(directory / "README.md")
    assert model_card.data.pipeline_tag == "image-text-to-text" and "llava" in model_card.data.tags
    assert f"{provenance['whole_model']['params']:,} parameters of {provenance['whole_model']['original_params']:,}" \
        in model_card.text
    assert "LlavaForConditionalGeneration.from_pretrained(checkpoint)" in model_card.text


def test_a_checkpoint_saved_with_a_bare_record_has_a_card_too(tiny_dirs, tmp_path):
    from mop.models import save_checkpoint

    loaded = load_model(str(tiny_dirs["llama-mha"]))
    save_checkpoint(loaded, loaded.model, tmp_path / "copy", {})
    model_card = ModelCard.load(tmp_path / "copy" / "README.md")
    assert model_card.data.base_model == "unknown" and model_card.data.tags == ["mop"]
    assert "records no pruning and no recovery" in model_card.text and "6 layers, 6 attention heads" in model_card.text
