"""LLaVA (`LlavaForConditionalGeneration`): MoP prunes the language model only, the vision tower and projector stay
bit for bit, the checkpoint reloads as a plain LLaVA with its processor, and the language model is pruned exactly
as the same weights would be as a bare LLaMA. Tiny random LLaVAs built here (a small CLIP vision tower, a small
LLaMA, the tiny test tokenizer with an `<image>` token); images from `$MOP_DATA_DIR/mllm_demo`."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (AutoProcessor, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

from conftest import train_tiny_tokenizer
from mop import cli
from mop.evaluation import multimodal
from mop.latency import LatencySettings, benchmark
from mop.latency.protocol import greedy_generate, image_prompt, image_prompt_latency
from mop.models import count_all_params, count_params, load_model, save_checkpoint
from mop.models.llava import PROMPT
from mop.pruning.search import Search, SearchConfig
from mop.pruning.surgery import prune_width
from mop.training import lora

DEMO = Path(os.environ["MOP_DATA_DIR"]) / "mllm_demo"
VISION = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=28, patch_size=14, projection_dim=32)
# GQA, 8 heads of 8 in 4 groups on d=64: one group out of every layer costs less than a layer, so width steps prune
# attention; 6 heads left do not divide 64 (the Mistral twin), 4 heads do but 64 / 4 ≠ head_dim
TEXT = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=96,
            num_hidden_layers=6, pad_token_id=2, bos_token_id=1, eos_token_id=2)
SEARCH = dict(calib_samples=8, calib_max_length=32, seed=3)  # the random path DWWD...
# transformers 5.x saves a LLaVA under its original (LLaVA-1.5) tensor names: language_model.model.*,
# language_model.lm_head.weight, vision_tower.*, multi_modal_projector.*
VISUAL_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def build_llava(directory: Path, text: LlamaConfig, tokenizer, processor: bool = True, seed: int = 0,
                language_weights: dict | None = None) -> Path:
    """A LLaVA-1.5-shaped checkpoint: the tiny CLIP vision tower, a projector, the LLaMA `text` (random, or
    `language_weights` of a LlamaForCausalLM) and, with `processor`, a LlavaProcessor over `tokenizer`."""
    config = LlavaConfig(vision_config=VISION, text_config=text, image_token_index=text.vocab_size - 1,
                         image_seq_length=(VISION.image_size // VISION.patch_size) ** 2, vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if language_weights is not None:
        renamed = {name.replace("model.", "model.language_model.", 1): tensor for name, tensor in language_weights.items()}
        missing, unexpected = model.load_state_dict(renamed, strict=False)
        visual = ("model.vision_tower.", "model.multi_modal_projector.")
        assert not unexpected and all(name.startswith(visual) for name in missing), (missing, unexpected)
    model.save_pretrained(directory)
    if processor:
        images = CLIPImageProcessor(size={"shortest_edge": VISION.image_size},
                                    crop_size={"height": VISION.image_size, "width": VISION.image_size})
        LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=VISION.patch_size,
                       vision_feature_select_strategy="default", image_token="<image>",
                       num_additional_image_tokens=1).save_pretrained(directory)
    else:
        tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_tokenizer():
    tokenizer = train_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory, image_tokenizer) -> Path:
    text = LlamaConfig(**TEXT, vocab_size=len(image_tokenizer))
    return build_llava(tmp_path_factory.mktemp("llava") / "tiny", text, image_tokenizer)


def image_inputs(processor, image: str = "1.jpg", question: str = "Who are they?") -> dict:
    with Image.open(DEMO / image) as picture:
        return dict(processor(images=picture.convert("RGB"), text=PROMPT.format(question=question),
                              return_tensors="pt"))


def stored(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def language_params_from_config(text) -> int:
    """The language model's parameter count from its config alone: embeddings and an untied lm_head, the final
    norm, and per layer q, k, v, o, the three MLP projections and two norms."""
    d, heads, kv, head_dim, mlp = (text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
                                   text.head_dim, text.intermediate_size)
    layer = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * mlp + 2 * d
    return text.num_hidden_layers * layer + 2 * text.vocab_size * d + d


@torch.no_grad()
def logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("mode", ["mop", "depth", "width"])
def test_every_mode_prunes_the_language_model_only(tiny_llava, tmp_path, mode):
    loaded = load_model(str(tiny_llava))
    original_language, original_whole = count_params(loaded.model), count_all_params(loaded.model)
    state = Search(loaded, SearchConfig(targets=[0.3], mode=mode, **SEARCH), tmp_path).run()
    out = tmp_path / "target-30"
    path = "".join(record["choice"] for record in state.iterations)
    assert set(path) == {"mop": {"D", "W"}, "depth": {"D"}, "width": {"W"}}[mode], path

    # a plain reload with the processor gives the in-memory pruned model's logits on an image + text input
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = image_inputs(processor)
    assert inputs["input_ids"].eq(reloaded.config.image_token_index).sum() == reloaded.config.image_seq_length
    torch.testing.assert_close(logits(reloaded, inputs), logits(loaded.model, inputs), atol=1e-6, rtol=0)

    # the vision tower and the projector are the original tensors, bit for bit
    before, after = stored(tiny_llava), stored(out)
    visual = [name for name in before if name.startswith(VISUAL_PREFIXES)]
    assert visual and all(torch.equal(before[name], after[name]) for name in visual)

    # parameter accounting: --target counts the language model; mop.json has the whole model beside it
    record = json.loads((out / "mop.json").read_text())
    language = language_params_from_config(reloaded.config.text_config)
    assert original_language == language_params_from_config(LlavaForConditionalGeneration.from_pretrained(
        tiny_llava).config.text_config)
    vision = sum(before[name].numel() for name in visual)
    assert (record["params"], record["original_params"]) == (language, original_language)
    assert record["compression"] == 1 - language / original_language >= 0.3
    whole = count_all_params(reloaded)
    assert record["whole_model"] == {"params": whole, "original_params": original_whole,
                                     "compression": 1 - whole / original_whole}
    assert count_params(reloaded) == language and whole == language + vision
    assert original_whole == original_language + vision
    assert record["source"]["architecture"] == "LlavaForConditionalGeneration"

    # generation with the image, with the KV cache, is the uncached generation
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    cached = reloaded.generate(**inputs, use_cache=True, **kwargs)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 8
    assert torch.equal(cached, reloaded.generate(**inputs, use_cache=False, **kwargs))


@pytest.mark.parametrize("groups, text_type", [(1, "mistral"), (2, "llama")])
def test_text_config_head_dim_survives_save_and_reload(tiny_llava, tmp_path, groups, text_type):
    """6 heads of 8 do not divide d=64: the language model is written as its Mistral twin. 4 heads do, but
    64 / 4 = 16 is not head_dim 8: the saved text_config must carry head_dim, or the reload builds other shapes."""
    loaded = load_model(str(tiny_llava))
    layers = len(loaded.adapter.layers(loaded.model))
    prune_width(loaded.model, loaded.adapter, [list(range(groups))] * layers, [[0, 5]] * layers)
    save_checkpoint(loaded, loaded.model, tmp_path / "out", {})
    text = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert (text["model_type"], text["head_dim"], text["num_attention_heads"]) == (text_type, 8, 8 - 2 * groups)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.text_config.head_dim == 8
    inputs = image_inputs(AutoProcessor.from_pretrained(tmp_path / "out"), "2.jpg")
    torch.testing.assert_close(logits(reloaded, inputs), logits(loaded.model, inputs), atol=1e-6, rtol=0)

    # the written checkpoint (a Mistral twin or a LLaMA inside) is searched again like any LLaVA
    again = load_model(str(tmp_path / "out"))
    Search(again, SearchConfig(targets=[0.1], **SEARCH), tmp_path / "again").run()
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "again" / "target-10").eval()
    assert (reloaded.config.text_config.model_type, reloaded.config.text_config.head_dim) == (text_type, 8)
    torch.testing.assert_close(logits(reloaded, inputs), logits(again.model, inputs), atol=1e-6, rtol=0)


def test_device_auto_loads_the_llava_class(tiny_llava):
    cpu, auto = load_model(str(tiny_llava)), load_model(str(tiny_llava), device="auto")
    assert type(auto.model) is LlavaForConditionalGeneration and auto.processor is not None
    assert auto.weights_sha256 == cpu.weights_sha256
    inputs = image_inputs(cpu.processor)
    torch.testing.assert_close(logits(auto.model, inputs), logits(cpu.model, inputs), atol=1e-6, rtol=0)


def test_cli_prune_reports_language_and_whole_model(tiny_llava, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["prune", str(tiny_llava), "--target", "0.2", "--out", str(out), "--calib-samples", "8",
                     "--calib-max-length", "32"]) == 0
    record = json.loads((out / "target-20" / "mop.json").read_text())
    printed = " ".join(capsys.readouterr().out.split())
    assert f"{record['params']:,} parameters" in printed
    assert f"whole model {record['whole_model']['params']:,} parameters" in printed


def test_smollm2_inside_llava_is_pruned_exactly_like_smollm2(smollm2_dir, tmp_path):
    """SmolLM2-135M as the language model of a LLaVA (a small random vision tower and projector around the real
    weights): the same seed and calibration give the same path, the same removed units and bitwise the same
    language-model weights as pruning SmolLM2 itself."""
    config = SearchConfig(targets=[0.1], calib_samples=8, calib_max_length=64, seed=3)
    bare = load_model(str(smollm2_dir))
    text = bare.model.config
    weights = {name: tensor for name, tensor in bare.model.state_dict().items()}
    llava_dir = build_llava(tmp_path / "llava", text, bare.tokenizer, processor=False, language_weights=weights)
    del weights
    bare_state = Search(bare, config, tmp_path / "bare").run()
    del bare
    llava = load_model(str(llava_dir))
    assert llava.processor is None  # no processor files: the language model is still pruned, with a warning
    llava_state = Search(llava, config, tmp_path / "in-llava").run()

    assert [r["removed"] for r in llava_state.iterations] == [r["removed"] for r in bare_state.iterations]
    bare_record = json.loads((tmp_path / "bare" / "target-10" / "mop.json").read_text())
    llava_record = json.loads((tmp_path / "in-llava" / "target-10" / "mop.json").read_text())
    for key in ("path", "params", "original_params", "compression", "non_embedding_compression"):
        assert llava_record[key] == bare_record[key], key
    bare_weights, llava_weights = stored(tmp_path / "bare" / "target-10"), stored(tmp_path / "in-llava" / "target-10")
    language = {name.removeprefix("language_model."): tensor for name, tensor in llava_weights.items()
                if not name.startswith(VISUAL_PREFIXES)}
    assert language.keys() == bare_weights.keys()
    assert all(torch.equal(language[name], bare_weights[name]) for name in bare_weights)


# ---------------------------------------------------------------- recovery


def test_lora_lands_on_the_language_model_only(tiny_llava):
    """The vision tower's attention has q_proj/k_proj/v_proj too: adapters only on the decoder's seven projections."""
    loaded = load_model(str(tiny_llava))
    peft_model = lora.attach_lora(loaded.model, lora.LoraSettings(rank=4), seed=0)
    adapted = sorted({name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name})
    assert len(adapted) == 7 * TEXT["num_hidden_layers"]
    assert all(".language_model.layers." in name for name in adapted)


def alpaca_rows(path: Path, count: int = 8) -> Path:
    rows = json.loads((Path(os.environ["MOP_DATA_DIR"]) / "alpaca" / "alpaca_en_demo.json").read_text())[:count]
    path.write_text(json.dumps(rows))
    return path


def text_loss(directory: Path, data_file: Path) -> float:
    """Mean token loss of the Alpaca rows' responses (prompt masked), text only."""
    from mop import data
    from mop.training.losses import cross_entropy_sum, target_count

    loaded = load_model(str(directory))
    rows = data.sft_rows(loaded.tokenizer, data.load_examples(str(data_file)), 256)
    batch = data.collate([ids for ids, _ in rows], loaded.tokenizer.pad_token_id, [labels for _, labels in rows])
    with torch.no_grad():
        return cross_entropy_sum(loaded.model, batch).item() / sum(target_count(row) for row in rows)


def test_text_only_recovery_keeps_the_vision_tower_and_writes_a_llava(tiny_llava, tmp_path):
    data_file = alpaca_rows(tmp_path / "alpaca.json")
    out = tmp_path / "recovered"
    assert cli.main(["finetune", str(tiny_llava), "--out", str(out), "--data", str(data_file), "--max-steps", "2",
                     "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "256", "--lr", "1e-2"]) == 0
    settings = json.loads((out / "mop.json").read_text())["finetune"]["settings"]["lora"]
    assert (settings["rank"], settings["alpha"]) == (8, 16)  # the paper's multimodal LoRA, by default
    assert text_loss(out, data_file) < text_loss(tiny_llava, data_file)

    before, after = stored(tiny_llava), stored(out)
    assert before.keys() == after.keys()
    for name in before:  # LoRA changed the decoder's projections only
        changed = not torch.equal(before[name], after[name])
        assert changed == (name.startswith("language_model.model.layers.") and name.endswith("_proj.weight")), name
    assert (out / "processor_config.json").is_file()
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    inputs = image_inputs(AutoProcessor.from_pretrained(out), "3.jpg")
    torch.testing.assert_close(logits(reloaded, inputs), logits(load_model(str(out)).model, inputs), atol=1e-6, rtol=0)


def test_distillation_from_the_source_llava(tiny_llava, tmp_path):
    """`--method kd` on a pruned LLaVA: the teacher is the source LLaVA named in mop.json, text only."""
    Search(load_model(str(tiny_llava)), SearchConfig(targets=[0.2], **SEARCH), tmp_path / "run").run()
    text = tmp_path / "text.txt"
    text.write_text("\n".join((Path(os.environ["MOP_DATA_DIR"]) / "wikitext2" / "wiki.test.raw").read_text()
                              .splitlines()[:40]))
    out = tmp_path / "kd"
    assert cli.main(["finetune", str(tmp_path / "run" / "target-20"), "--out", str(out), "--method", "kd",
                     "--kd-data", str(text), "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2",
                     "--max-length", "64"]) == 0
    record = json.loads((out / "mop.json").read_text())["finetune"]
    assert record["teacher"]["sha256"] == load_model(str(tiny_llava)).weights_sha256
    before, after = stored(tiny_llava), stored(out)
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith(VISUAL_PREFIXES))


def test_explicit_rank_and_alpha_override_the_multimodal_default(tiny_llava):
    from mop.training.recovery import recovery_lora

    assert (recovery_lora(str(tiny_llava)).rank, recovery_lora(str(tiny_llava)).alpha) == (8, 16)
    assert (recovery_lora(str(tiny_llava), rank=32, alpha=10).rank, recovery_lora(str(tiny_llava), alpha=10).alpha) \
        == (32, 10)


# ---------------------------------------------------------------- evaluation and latency


def test_demo_check_scores_each_answer_with_its_image_and_another(tiny_llava):
    loaded = load_model(str(tiny_llava))
    record = multimodal.demo_check(loaded)
    items = multimodal.demo_items(DEMO / "mllm_demo.json")
    assert record["items"] == len(items) == 6 and [r["image"] for r in record["per_item"]] == [
        item.image.name for item in items]
    assert all(r["image"] != r["other_image"] for r in record["per_item"])
    # the first item's NLL, through transformers' own loss on the same ids (labels: the answer tokens only)
    first, item = record["per_item"][0], items[0]
    inputs = image_inputs(loaded.processor, item.image.name, item.question)
    answer = loaded.tokenizer(" " + item.answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([inputs["input_ids"], answer], dim=1)
    labels = torch.cat([torch.full_like(inputs["input_ids"], -100), answer], dim=1)
    with torch.no_grad():
        loss = loaded.model(input_ids=ids, pixel_values=inputs["pixel_values"], labels=labels).loss.item()
    assert first["answer_tokens"] == answer.shape[1]
    assert first["nll_own_image"] == pytest.approx(loss * answer.shape[1], rel=1e-5)
    total = sum(r["nll_own_image"] for r in record["per_item"])
    assert record["nll_per_token"]["own_image"] == pytest.approx(total / record["answer_tokens"], rel=1e-12)


def test_eval_text_tasks_on_the_language_model_and_the_image_check(tiny_llava, tmp_path):
    """`mop eval` on a LLaVA: the text tasks score exactly what they score on the bare language model (the same
    weights as a LlamaForCausalLM); mllm_demo adds the image + text record."""
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    bare = LlamaForCausalLM(llava.config.text_config)
    bare.model.load_state_dict(llava.model.language_model.state_dict())
    bare.lm_head.load_state_dict(llava.lm_head.state_dict())
    bare.save_pretrained(tmp_path / "bare")
    AutoProcessor.from_pretrained(tiny_llava).tokenizer.save_pretrained(tmp_path / "bare")
    options = ["--limit", "4", "--ppl-segment-length", "64"]
    assert cli.main(["eval", str(tiny_llava), "--tasks", "arc_easy,wikitext,mllm_demo", "--output",
                     str(tmp_path / "llava.json"), *options]) == 0
    assert cli.main(["eval", str(tmp_path / "bare"), "--tasks", "arc_easy,wikitext", "--output",
                     str(tmp_path / "bare.json"), *options]) == 0
    llava_record = json.loads((tmp_path / "llava.json").read_text())
    bare_record = json.loads((tmp_path / "bare.json").read_text())
    assert llava_record["tasks"]["arc_easy"]["acc"] == bare_record["tasks"]["arc_easy"]["acc"]
    assert llava_record["tasks"]["arc_easy"]["acc_norm"] == bare_record["tasks"]["arc_easy"]["acc_norm"]
    assert llava_record["tasks"]["wikitext"]["perplexity"] == pytest.approx(
        bare_record["tasks"]["wikitext"]["perplexity"], rel=1e-6)
    demo = llava_record["multimodal"]["tasks"]["mllm_demo"]
    assert demo["items"] == 6 and demo["nll_per_token"]["own_image"] > 0


def test_eval_benchmarks_without_lmms_eval_fail_in_one_line(tiny_llava, tmp_path, capsys):
    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed")
    code = cli.main(["eval", str(tiny_llava), "--tasks", "scienceqa_img", "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lmms-eval" in err[0] and "mllm_demo" in err[0]
    assert not (tmp_path / "r.json").exists()


def test_bench_times_an_image_and_text_prompt(tiny_llava, tmp_path):
    loaded = load_model(str(tiny_llava))
    inputs = image_prompt(loaded.processor)
    assert inputs["input_ids"].eq(loaded.model.config.image_token_index).sum() == loaded.model.config.image_seq_length
    # the timed loop's tokens with the image are greedy generate's
    generation = greedy_generate(loaded.model, inputs["input_ids"], 6, pixel_values=inputs["pixel_values"])
    expected = loaded.model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(generation.tokens, expected[:, inputs["input_ids"].shape[1]:])

    ticks = iter(range(10**6))
    settings = LatencySettings(runs=3, warmup=1, prompt_tokens=4, new_tokens=4, prefill_tokens=8)
    record = image_prompt_latency({"baseline": loaded, "candidate": loaded}, loaded.processor, settings,
                                          clock=lambda: float(next(ticks)))
    assert record["prompt"]["tokens"] == inputs["input_ids"].shape[1]
    # a clock that ticks once per reading: prefill and decode take one tick each, in every run of both models
    assert record["models"]["candidate"]["end_to_end_s"] == {"mean": 2.0, "std": 0.0}
    assert len(record["models"]["baseline"]["raw"]["end_to_end_s"]) == 3
    assert record["speedup"]["mean"] == 1.0
    full = benchmark(loaded, None, settings)
    assert full["image_prompt"]["prompt"]["tokens"] == inputs["input_ids"].shape[1]
    assert full["image_prompt"]["speedup"] is None


def test_mop_run_on_a_llava(tiny_llava, tmp_path):
    """The whole recipe on a LLaVA: search, text-only recovery with the multimodal LoRA, text evaluation; the report
    gives the language model's parameters beside the whole model's."""
    out = tmp_path / "run"
    assert cli.main(["run", str(tiny_llava), "--target", "0.2", "--calib-samples", "8", "--calib-max-length", "32",
                     "--recovery-steps", "1", "--recovery-batch-size", "2", "--recovery-micro-batch-size", "2",
                     "--recovery-max-length", "128", "--tasks", "wikitext", "--eval-limit", "1",
                     "--eval-ppl-segment-length", "64", "--no-bench", "--out", str(out)]) == 0
    recovered = out / "seed-0" / "recovered" / "target-20"
    record = json.loads((recovered / "mop.json").read_text())
    assert (record["finetune"]["settings"]["lora"]["rank"], record["finetune"]["settings"]["lora"]["alpha"]) == (8, 16)
    assert (recovered / "processor_config.json").is_file()
    evaluation = json.loads((out / "seed-0" / "eval" / "target-20.json").read_text())["model"]
    assert evaluation["params"] == record["params"]
    assert evaluation["whole_model_params"] == record["whole_model"]["params"]
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| target-20 "))
    assert f"{record['params'] / 1e6:.2f} M (whole model {record['whole_model']['params'] / 1e6:.2f} M)" in row
