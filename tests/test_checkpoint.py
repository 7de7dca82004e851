"""Every saved checkpoint is a plain Hugging Face checkpoint: it reloads with AutoModelForCausalLM, gives the
same logits as the pruned model in memory, and generates with the KV cache, in every mode and family."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from mop import cli
from mop.errors import MopError
from mop.models import count_params, load_model, loading, saved_weights_sha256, weights_sha256
from mop.pruning.search import Search, SearchConfig
from mop.training import LoraSettings

IDS = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(1))
SMALL = dict(calib_samples=8, calib_max_length=64, path_samples=8, path_max_length=64, tune_steps_per_iteration=1,
             lora=LoraSettings(batch_size=4, micro_batch_size=2, max_length=128))


def run_search(directory, out, **options):
    loaded = load_model(str(directory))
    search = Search(loaded, SearchConfig(**{**SMALL, **options}), out)
    return loaded, search, search.run()


def assert_reloads_identically(model, checkpoint):
    reloaded, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5, rtol=0)
    assert count_params(reloaded) == count_params(model)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(reloaded.generate(IDS[:1], use_cache=True, **kwargs),
                       reloaded.generate(IDS[:1], use_cache=False, **kwargs))
    return reloaded


@pytest.mark.parametrize("mode", ["mop", "depth", "width"])
def test_save_reload_logits_and_generate(tiny_dirs, family, mode, tmp_path):
    loaded, search, state = run_search(tiny_dirs[family], tmp_path, targets=[0.3], mode=mode, seed=1)
    checkpoint = tmp_path / "target-30"
    reloaded = assert_reloads_identically(search.model, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["head_dim"] == reloaded.config.head_dim
    assert config["num_hidden_layers"] == len(reloaded.model.layers)
    provenance = json.loads((checkpoint / "mop.json").read_text())
    path = "".join(r["choice"] for r in state.iterations)
    assert provenance["path"] == path and set(path) <= {"mop": {"W", "D"}, "depth": {"D"}, "width": {"W"}}[mode]
    assert provenance["params"] == count_params(reloaded)
    assert provenance["compression"] == 1 - count_params(reloaded) / provenance["original_params"]
    assert provenance["source"]["sha256"] == loaded.weights_sha256
    assert len(provenance["iterations"]) == len(state.iterations)
    layers = AutoConfig.from_pretrained(tiny_dirs[family]).num_hidden_layers
    for record in state.iterations:  # a width plan removes p_l within one neuron per layer of the model it prunes
        plan = record["width_plan"]
        assert abs(plan["achieved"] - plan["planned"]) < loaded.adapter.shape(loaded.model).neuron_params * layers
        layers -= record["choice"] == "D"


def test_head_count_that_does_not_divide_hidden_size_loads_as_mistral(tiny_dirs, tmp_path):
    """6 heads of 16 on d=96 lose one head per width step: 5 heads do not divide 96 (LlamaConfig refuses)."""
    loaded, search, _ = run_search(tiny_dirs["llama-mha"], tmp_path, targets=[0.15], mode="width")
    config = AutoConfig.from_pretrained(tmp_path / "target-15")
    assert 96 % config.num_attention_heads != 0
    assert config.model_type == "mistral" and config.sliding_window is None
    # engines that choose the class by `architectures` (vLLM) must see Mistral too
    assert json.loads((tmp_path / "target-15" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    reloaded = assert_reloads_identically(search.model, tmp_path / "target-15")
    assert type(reloaded).__name__ == "MistralForCausalLM"


def test_several_targets_from_one_search(tiny_dirs, tmp_path):
    _, _, state = run_search(tiny_dirs["qwen2"], tmp_path, targets=[0.2, 0.4], seed=2)
    run = json.loads((tmp_path / "run.json").read_text())
    assert sorted(run["targets"]) == ["target-20", "target-40"]
    for name, reached in run["targets"].items():
        provenance = json.loads((tmp_path / name / "mop.json").read_text())
        assert provenance["path"] == "".join(r["choice"] for r in run["iterations"][: reached["iteration"]])
        assert provenance["params"] == reached["params"] == run["iterations"][reached["iteration"] - 1]["params"]
        # the first iteration that reaches the target
        before = run["iterations"][reached["iteration"] - 2]["compression"] if reached["iteration"] > 1 else 0
        assert before < reached["target"] <= provenance["compression"]


def test_scored_path_criterion_keeps_pre_tuning_weights(tiny_dirs, tmp_path):
    """With kl, both candidates are LoRA-tuned and scored; the winner continues with its untuned weights."""
    loaded, search, state = run_search(tiny_dirs["llama-gqa"], tmp_path, targets=[0.2], path_criterion="kl")
    # a candidate is never F itself: both KL scores are positive, and the two candidates differ
    assert all(r["decided_by"] == "kl" and r["scores"]["W"] > 0 and r["scores"]["D"] > 0
               and r["scores"]["W"] != r["scores"]["D"] for r in state.iterations)
    assert all(r["choice"] == ("W" if r["scores"]["W"] <= r["scores"]["D"] else "D") for r in state.iterations)
    replayed = load_model(str(tiny_dirs["llama-gqa"]))
    fresh = Search(replayed, SearchConfig(targets=[0.2], path_criterion="kl", **SMALL), tmp_path / "other")
    for record in state.iterations:
        fresh.replay(record)
    for (name, a), (_, b) in zip(search.model.state_dict().items(), fresh.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # no LoRA residue, no tuned weights


def test_device_auto_uses_accelerate_device_map(tiny_dirs, tmp_path):
    """On a CPU-only machine the device map puts everything on the CPU; the search runs through it unchanged."""
    loaded = load_model(str(tiny_dirs["mistral"]), device="auto")
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    Search(loaded, SearchConfig(targets=[0.1], **SMALL), tmp_path).run()
    assert_reloads_identically(loaded.model, tmp_path / "target-10")


def test_device_auto_refuses_offloaded_weights(tiny_dirs, tmp_path, monkeypatch, capsys):
    """A memory budget the model does not fit makes accelerate offload layers to the disk, leaving their
    parameters on the meta device (as a GPU map that spills to the CPU does): refused at load, in one line."""
    from_pretrained = loading.AutoModelForCausalLM.from_pretrained

    class Spilling:  # the device map of a machine with ~0.4 MB of memory: embeddings and layer 0 fit (0.87 MB in all)
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return from_pretrained(*args, max_memory={"cpu": 400_000}, **kwargs)

    monkeypatch.setattr(loading, "AutoModelForCausalLM", Spilling)
    with pytest.raises(MopError, match=r"\(model\.layers\.1 is offloaded\)"):
        load_model(str(tiny_dirs["llama-gqa"]), device="auto")
    out = tmp_path / "run"
    assert cli.main(["prune", str(tiny_dirs["llama-gqa"]), "--device", "auto", "--target", "0.2", "--out", str(out)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the loading bars
    assert error.startswith("mop: error: --device auto leaves part of") and error.endswith("more memory")
    assert not out.exists()


@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha"])  # tied and untied embeddings
def test_weights_hash_is_of_tensor_contents_not_files(tiny_dirs, tmp_path, family):
    """One digest of the weights everywhere: the stored tensors, whatever the file layout, metadata, the dtype or
    the device the model is loaded in; and what saving a model in memory will give."""
    source = tiny_dirs[family]
    digest = weights_sha256(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    assert saved_weights_sha256(model) == digest
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    tensors = load_file(source / "model.safetensors")
    shutil.copytree(source, tmp_path / "metadata")  # config and tokenizer; the weights re-saved with other metadata
    save_file(tensors, tmp_path / "metadata" / "model.safetensors", metadata={"format": "pt", "saved_by": "someone else"})
    assert (tmp_path / "metadata" / "model.safetensors").read_bytes() != (source / "model.safetensors").read_bytes()
    assert weights_sha256(tmp_path / "sharded") == weights_sha256(tmp_path / "metadata") == digest
    for directory, device, dtype in [(source, "cpu", "bfloat16"), (source, "auto", "float32"), (tmp_path / "metadata", "cpu", "float32")]:
        assert load_model(str(directory), device, dtype).weights_sha256 == digest
    tensors["model.norm.weight"][0] += 1
    save_file(tensors, tmp_path / "metadata" / "model.safetensors")
    assert weights_sha256(tmp_path / "metadata") != digest
