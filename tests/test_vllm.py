"""Every checkpoint class `mop` writes serves in vLLM exactly as transformers runs it (greedy, float32).

vLLM lives in its own virtual environment (it pins its own torch and transformers): `scripts/install-vllm.sh` makes
one, and `MOP_VLLM_PYTHON` (or the default location, see `mop.serving.vllm_check`) names its interpreter.
Without it the vLLM tests are skipped with the reason; with `MOP_REQUIRE_VLLM=1` (CI) they fail instead.

The tiny models differ from conftest's in two ways that vLLM needs: head_dim 32 (vLLM's CPU attention has no
kernel for 16; real models use 64 or 128, and pruning never changes head_dim) and weights drawn at std 0.15, so
that greedy decoding produces varied tokens with clear margins instead of repeating one token of a near-uniform
distribution, which would not exercise attention.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from mop.cli import main as mop
from mop.serving.vllm_check import check, compare, find_vllm_python, serving_overrides

from conftest import random_model, tiny_model

FAMILIES = {
    # MHA, 6 heads on d=192: losing one head leaves 5, which does not divide 192 (exported as Mistral)
    "llama-mha": lambda: LlamaConfig(hidden_size=192, num_attention_heads=6, num_key_value_heads=6, head_dim=32,
                                     intermediate_size=256, num_hidden_layers=4, tie_word_embeddings=False),
    # GQA (2 query heads per KV head), tied embeddings; 8 heads x 32 on d=192, so 6 heads still divide it
    "llama-gqa": lambda: LlamaConfig(hidden_size=192, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                     intermediate_size=384, num_hidden_layers=4, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                     intermediate_size=384, num_hidden_layers=4, sliding_window=None),
    # q/k/v biases; heads x head_dim = hidden_size, as in real Qwen2 models
    "qwen2": lambda: Qwen2Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                 intermediate_size=384, num_hidden_layers=4, tie_word_embeddings=True),
}
SMALL = ["--calib-samples", "8", "--calib-max-length", "64"]
# name -> (family, mop prune arguments, whether the result is then recovered with one merged LoRA step)
CASES = {
    "llama-mha-depth": ("llama-mha", ["--mode", "depth", "--target", "0.2"], False),
    "llama-to-mistral": ("llama-mha", ["--mode", "width", "--target", "0.2"], False),
    "llama-gqa-width": ("llama-gqa", ["--mode", "width", "--target", "0.2"], False),
    "mistral-width": ("mistral", ["--mode", "width", "--target", "0.2"], False),
    "qwen2-width": ("qwen2", ["--mode", "width", "--target", "0.2"], False),
    "recovered": ("llama-gqa", ["--mode", "mop", "--seed", "3", "--target", "0.4"], True),
}


def tiny_family(family: str) -> torch.nn.Module:
    config = FAMILIES[family]()
    config.initializer_range = 0.15
    return random_model(config)


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    python, why = find_vllm_python()
    if python is None:
        if os.environ.get("MOP_REQUIRE_VLLM"):
            pytest.fail(f"MOP_REQUIRE_VLLM is set but vLLM is missing: {why}")
        pytest.skip(f"vLLM not installed: {why}")
    return python


@pytest.fixture(scope="module")
def checkpoints(vllm_python, tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm")
    dense = {}
    for family in sorted({family for family, _, _ in CASES.values()}):
        tiny_family(family).save_pretrained(root / "dense" / family)
        tokenizer.save_pretrained(root / "dense" / family)
        dense[family] = root / "dense" / family
    out = {}
    for name, (family, args, recover) in CASES.items():
        run = root / name
        assert mop(["prune", str(dense[family]), *args, *SMALL, "--out", str(run)]) == 0
        target = next(run.glob("target-*"))
        if recover:
            assert mop(["finetune", str(target), "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2",
                        "--max-length", "256", "--out", str(run / "recovered")]) == 0
            target = run / "recovered"
        out[name] = target
    return out


@pytest.fixture(scope="module")
def served(vllm_python, checkpoints, tmp_path_factory, tokenizer):
    """Every case checked in one batch, with an unservable checkpoint in the middle: conftest's tiny LLaMA, whose
    head_dim 16 vLLM's CPU attention refuses. Its failure must be reported, and the cases after it still run."""
    unservable = tmp_path_factory.mktemp("vllm") / "head-dim-16"
    tiny_model("llama-gqa").save_pretrained(unservable)
    tokenizer.save_pretrained(unservable)
    names = list(checkpoints)
    half = len(names) // 2
    order = names[:half] + ["head-dim-16"] + names[half:]
    paths = {**checkpoints, "head-dim-16": unservable}
    results = check([paths[name] for name in order], python=vllm_python)
    return dict(zip(order, results))


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_checkpoint_classes(checkpoints):
    """The cases are what they claim to be, so that the vLLM test covers every class."""
    c = {name: config(path) for name, path in checkpoints.items()}
    assert c["llama-mha-depth"]["model_type"] == "llama" and c["llama-mha-depth"]["num_hidden_layers"] == 3
    assert c["llama-mha-depth"]["num_attention_heads"] == c["llama-mha-depth"]["num_key_value_heads"] == 6
    mistral = c["llama-to-mistral"]
    assert mistral["model_type"] == "mistral" and mistral["hidden_size"] % mistral["num_attention_heads"] != 0
    assert mistral["num_attention_heads"] == mistral["num_key_value_heads"] == 5
    gqa = c["llama-gqa-width"]
    assert gqa["model_type"] == "llama" and gqa["num_hidden_layers"] == 4
    assert gqa["num_key_value_heads"] < 4 and gqa["num_attention_heads"] == 2 * gqa["num_key_value_heads"]
    assert gqa["intermediate_size"] < 384
    assert c["mistral-width"]["model_type"] == "mistral" and c["mistral-width"]["num_key_value_heads"] < 4
    qwen = c["qwen2-width"]
    assert qwen["model_type"] == "qwen2" and qwen["num_key_value_heads"] < 4
    provenance = json.loads((checkpoints["recovered"] / "mop.json").read_text())
    assert "finetune" in provenance and set(provenance["path"]) == {"D", "W"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_greedy_matches_transformers(served, case):
    result = served[case]
    assert result.error is None, result.error
    for prompt in result.prompts:
        assert prompt.vllm_ids == prompt.transformers_ids, f"{case}: vLLM's greedy tokens differ from transformers'"
        assert len(set(prompt.vllm_ids)) > 2, "degenerate generation: the comparison would prove little"
    assert result.max_logprob_diff < 1e-4, f"{case}: log-probabilities differ by {result.max_logprob_diff:.2e}"
    assert result.ok
    # a pruned Qwen2 only serves through the LLaMA override (vLLM's Qwen2 ignores head_dim); nothing else needs one
    assert (result.hf_overrides is not None) == (case == "qwen2-width")


def test_vllm_failure_is_reported(served):
    result = served["head-dim-16"]
    assert not result.ok and result.error.startswith("vLLM: ") and "head_dim=16" in result.error
    assert not result.prompts


# What follows needs no vLLM.

def test_serving_overrides():
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "num_attention_heads": 14, "head_dim": 64}
    assert serving_overrides(qwen2) is None  # unpruned: vLLM's derivation of head_dim is right
    assert serving_overrides({**qwen2, "num_attention_heads": 7}) == {"architectures": ["LlamaForCausalLM"],
                                                                      "qkv_bias": True}
    assert serving_overrides({**qwen2, "num_attention_heads": 7, "use_sliding_window": True}) is None
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 7, "head_dim": 64}
    assert serving_overrides(llama) is None  # vLLM's LLaMA and Mistral read head_dim


def test_compare_detects_differences():
    rows = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0005, 0.0]]), dim=-1)
    hf = [([0, 1, 1], rows)]

    def record(ids, shift=0.0):
        top = [{str(t): float(rows[i, t]) + shift for t in range(3)} for i in range(3)]
        return {"token_ids": [ids], "top_logprobs": [top]}

    (same,), diff = compare(hf, record([0, 1, 1]), atol=1e-3)
    assert same.tokens_equal and diff == 0.0
    (off,), diff = compare(hf, record([0, 1, 1], shift=0.01), atol=1e-3)
    assert off.tokens_equal and diff == pytest.approx(0.01, abs=1e-6)
    (flip,), _ = compare(hf, record([0, 2, 1]), atol=1e-3)
    assert not flip.tokens_equal and flip.first_mismatch == 1 and not flip.near_tie
    (tie,), _ = compare(hf, record([0, 1, 0]), atol=1e-3)
    assert tie.first_mismatch == 2 and tie.near_tie  # 1.0 vs 1.0005: a tie within atol


def test_missing_interpreter_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("MOP_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    python, why = find_vllm_python()
    assert python is None and "MOP_VLLM_PYTHON" in why and "scripts/install-vllm.sh" in why
    with pytest.raises(FileNotFoundError):
        check([tmp_path])


def test_mop_check_command(checkpoints, capsys, tmp_path, tokenizer):
    """`mop check` passes a servable checkpoint (exit 0, its verdict and a JSON record) and refuses one whose
    head_dim vLLM cannot serve in one line (exit 2)."""
    record = tmp_path / "check.json"
    assert mop(["check", str(checkpoints[sorted(checkpoints)[0]]), "--max-new-tokens", "4", "--json", str(record)]) == 0
    assert capsys.readouterr().out.startswith("ok")
    assert json.loads(record.read_text())[0]["ok"] is True
    unservable = tmp_path / "head-dim-16"
    tiny_model("llama-gqa").save_pretrained(unservable)
    tokenizer.save_pretrained(unservable)
    assert mop(["check", str(unservable), "--max-new-tokens", "4"]) == 2
    assert "1 of 1 checkpoints do not decode as in transformers" in capsys.readouterr().err


def test_mop_check_without_vllm_is_one_line(monkeypatch, tmp_path, capsys, tiny_dirs):
    monkeypatch.setenv("MOP_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    assert mop(["check", str(tiny_dirs["mistral"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mop: error: vLLM not found") and len(err.strip().splitlines()) == 1


def test_bench_in_vllm_follows_the_protocol(vllm_python, checkpoints, tmp_path):
    """`mop bench --engine vllm`: both models served side by side, every run kept raw, exactly the asked tokens,
    and speedups that are the per-run ratios of those raw times."""
    candidate = checkpoints["llama-mha-depth"]
    output = tmp_path / "bench.json"
    assert mop(["bench", str(candidate), "--engine", "vllm", "--runs", "4", "--warmup", "1", "--new-tokens", "8",
                "--batch", "3", "--batch-runs", "3", "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    assert record["engine"] == "vllm" and record["vllm_version"]
    baseline, pruned = record["models"]["baseline"], record["models"]["candidate"]
    assert baseline["name"] == json.loads((candidate / "mop.json").read_text())["source"]["name"]
    for model in (baseline, pruned):
        raw = model["raw"]
        assert len(raw["end_to_end_s"]) == len(raw["first_token_s"]) == 4 and raw["batch_new_tokens"] == [24] * 3
        assert all(0 < f and 0 < e for f, e in zip(raw["first_token_s"], raw["end_to_end_s"]))
        # the warmup run (index 0) is cold and discarded: its first token alone may outlast a warm whole answer;
        # on a loaded machine one kept run may too, so the kept runs' means are compared
        assert sum(raw["first_token_s"][1:]) < sum(raw["end_to_end_s"][1:])
        assert model["first_token_s"]["mean"] == pytest.approx(sum(raw["first_token_s"][1:]) / 3)
        throughput = [24 / s for s in raw["batch_s"][1:]]
        assert model["throughput_tokens_per_s"]["mean"] == pytest.approx(sum(throughput) / 2)
    ratios = [b / c for b, c in zip(baseline["raw"]["end_to_end_s"][1:], pruned["raw"]["end_to_end_s"][1:])]
    assert record["speedup"]["mean"] == pytest.approx(sum(ratios) / 3) and record["speedup"]["runs"] == 3
    assert len(record["prompt"]["ids"]) == 12


def test_bench_in_vllm_refuses_without_vllm(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOP_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    output = tmp_path / "bench.json"
    assert mop(["bench", str(tiny_dirs["llama-gqa"]), "--engine", "vllm", "--output", str(output)]) == 2
    assert "vLLM not found" in capsys.readouterr().err and not output.exists()


def test_latency_model_in_vllm_is_fitted_on_served_shapes(vllm_python, tmp_path, tokenizer):
    """`--latency-engine vllm`: the seven synthetic shapes served in vLLM, each timed for every quantity; the
    record names vLLM's release, and a quarter of the layers is predicted faster, as timed (32 layers, so that
    the layers and not the engine's fixed cost per step decide the time)."""
    from mop.latency.model import config_shape, measure_latency_model, synthetic_shapes
    from mop.latency.protocol import LatencySettings
    from mop.latency.vllm_bench import vllm_version

    config = FAMILIES["llama-gqa"]()
    config.num_hidden_layers = 32
    settings = LatencySettings(runs=3, warmup=1, prompt_tokens=12, new_tokens=8, prefill_tokens=64,
                               time_generate=False)
    model = measure_latency_model(config, settings, engine="vllm", tokenizer=tokenizer, cache=tmp_path)
    dense = config_shape(config)
    assert [t.shape for t in model.timings] == synthetic_shapes(dense)
    assert all(0 < t.seconds["decode"] < t.seconds["end_to_end"] for t in model.timings)
    assert model.context["engine"] == "vllm" and model.context["versions"] == {"vllm": vllm_version(vllm_python)}
    quarter = model.timings[2]
    assert quarter.shape.layers == 8 and quarter.seconds["end_to_end"] < model.timings[0].seconds["end_to_end"]
    assert model.speedup(dense, quarter.shape) > 1
