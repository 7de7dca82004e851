"""End to end on the embedded SmolLM2-135M-Instruct: `mop prune smollm2-135m` writes a plain checkpoint that
reloads with the same logits, generates with the cache, and has exactly the recorded parameter count."""

import json
import subprocess

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mop.models.adapters import adapter_for
from mop.models import count_params, load_model
from mop.pruning.surgery import prune_width, remove_layer

SMOLLM2_PARAMS = 134_515_008


def test_embedded_model_is_smollm2(smollm2_dir):
    loaded = load_model("smollm2-135m")
    shape = loaded.adapter.shape(loaded.model)
    assert count_params(loaded.model) == SMOLLM2_PARAMS
    assert (len(loaded.adapter.layers(loaded.model)), shape.hidden, shape.heads, shape.kv_heads, shape.head_dim,
            shape.intermediate) == (30, 576, 9, 3, 64, 1536)
    assert loaded.model.config.tie_word_embeddings


def test_conversion_finished_by_another_process_is_reused(smollm2_dir, tmp_path, monkeypatch):
    """Two runs that start together on a fresh machine both convert the GGUF: the one that renames second keeps
    the first one's directory and leaves no partial copy behind."""
    from mop.models import loading

    monkeypatch.setenv("MOP_CACHE_DIR", str(tmp_path))
    target = tmp_path / "smollm2-135m"
    real = loading.AutoTokenizer.from_pretrained

    def tokenizer_while_another_process_finishes(*args, **kwargs):
        target.mkdir()  # the other process's rename lands while this one is still converting
        (target / "config.json").write_text("{}")
        return real(*args, **kwargs)

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", tokenizer_while_another_process_finishes)
    assert loading.embedded_model_dir("smollm2-135m") == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]


def test_prune_smollm2_cli_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(["mop", "prune", "smollm2-135m", "--target", "0.1", "--seed", "0", "--calib-samples", "32",
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    provenance = json.loads((out / "target-10" / "mop.json").read_text())
    assert provenance["original_params"] == SMOLLM2_PARAMS
    model = AutoModelForCausalLM.from_pretrained(out / "target-10")
    assert count_params(model) == provenance["params"] <= 0.9 * SMOLLM2_PARAMS
    # replaying the logged path on the original model gives the checkpoint's logits
    original = load_model("smollm2-135m")
    run = json.loads((out / "run.json").read_text())
    for record in run["iterations"]:
        if record["choice"] == "W":
            prune_width(original.model, original.adapter, record["removed"]["groups"], record["removed"]["neurons"])
        else:
            remove_layer(original.model, original.adapter, record["removed"]["layer"])
    tokenizer = AutoTokenizer.from_pretrained(out / "target-10")
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original.model(ids).logits, atol=1e-5, rtol=0)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8
    assert adapter_for(model).shape(model).intermediate == model.config.intermediate_size
