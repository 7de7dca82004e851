"""The latency protocol: exactly `new_tokens` greedy tokens (EOS does not stop them), the same tokens as
`generate`, models alternating run by run with the warmup runs discarded, the speedup statistics, and `mop bench`
(record fields, baseline from mop.json, bad input)."""

import importlib.metadata
import json
import statistics

import pytest
import torch

from conftest import tiny_model
from mop.cli import main
from mop.errors import MopError
from mop.latency import LatencySettings, benchmark, measure
from mop.latency.protocol import fixed_prompt, greedy_generate, run_order, speedup_stats, timed_generate
from mop.models import load_model, save_checkpoint
from mop.pruning.surgery import remove_layer

EOS = 2  # the tiny models' eos_token_id
TINY_BENCH = ["--runs", "3", "--warmup", "1", "--prompt-tokens", "6", "--new-tokens", "4", "--prefill-tokens", "16"]


def favour_eos(model: torch.nn.Module) -> torch.nn.Module:
    """Make EOS the argmax at every position."""
    def boost(module, args, logits):
        logits[..., EOS] += 1000.0
        return logits

    model.lm_head.register_forward_hook(boost)
    return model


def one_second_per_pass(model: torch.nn.Module):
    """A fake clock that advances by 1 s at every forward pass of `model`."""
    now = [0.0]

    def advance(module, args, kwargs):
        now[0] += 1.0

    model.register_forward_pre_hook(advance, with_kwargs=True)
    return lambda: now[0]


def test_generates_exactly_new_tokens_past_eos(tokenizer):
    model = favour_eos(tiny_model("llama-gqa"))
    prompt = fixed_prompt(tokenizer, 12)
    assert model.generate(prompt, do_sample=False, max_new_tokens=16).shape[1] == 12 + 1  # generate stops at EOS
    generation = greedy_generate(model, prompt, 16, clock=one_second_per_pass(model))
    assert generation.tokens.tolist() == [[EOS] * 16]
    assert (generation.prefill_s, generation.decode_s) == (1.0, 15.0)  # one prompt pass, then one pass per token


def test_timed_generate_forces_exactly_new_tokens(tokenizer):
    """generate with min_new_tokens = max_new_tokens runs new_tokens passes and never stops at EOS (it suppresses
    EOS instead, so its tokens then differ from the greedy loop's, and the record says so)."""
    model = favour_eos(tiny_model("llama-gqa"))
    prompt = fixed_prompt(tokenizer, 12)
    tokens, seconds = timed_generate(model, prompt, 16, clock=one_second_per_pass(model))
    assert tokens.shape == (1, 16) and EOS not in tokens.tolist()[0]
    assert seconds == 16.0
    settings = LatencySettings(runs=3, warmup=1, prompt_tokens=4, new_tokens=3, prefill_tokens=8)
    generate = measure({"candidate": model}, tokenizer, settings)["candidate"]["generate"]
    assert generate["new_tokens"] == 3 and generate["same_tokens_as_loop"] is False


def test_without_generate_timing_each_run_is_the_loop_and_the_prefill_pass(tokenizer, tiny_dirs):
    """time_generate off: per run exactly the loop's new_tokens passes and the long prefill pass (1 s each on the
    fake clock), no generate record and no generate speedup."""
    settings = LatencySettings(runs=3, warmup=1, prompt_tokens=4, new_tokens=3, prefill_tokens=8, time_generate=False)
    model = tiny_model("llama-gqa")
    clock = one_second_per_pass(model)
    result = measure({"candidate": model}, tokenizer, settings, clock=clock)["candidate"]
    assert clock() == settings.runs * (settings.new_tokens + 1)
    assert result["generate"] is None and "generate_s" not in result["raw"]
    assert result["end_to_end_s"] == {"mean": 3.0, "std": 0.0}
    loaded = [load_model(str(tiny_dirs["llama-gqa"])) for _ in range(2)]
    record = benchmark(*loaded, settings)
    assert record["settings"]["time_generate"] is False
    assert record["generate_speedup"] is None and record["speedup"]["runs"] == 2


def test_greedy_tokens_equal_generate(family, tokenizer):
    model = tiny_model(family)
    prompt = fixed_prompt(tokenizer, 12)
    assert prompt.shape == (1, 12) and prompt[0, 0] == tokenizer.bos_token_id
    expected = model.generate(prompt, do_sample=False, max_new_tokens=20, eos_token_id=None)[:, 12:]
    generation = greedy_generate(model, prompt, 20)
    assert torch.equal(generation.tokens, expected)
    config = model.config
    kv_heads, layers = config.num_key_value_heads, config.num_hidden_layers
    # keys and values of the prompt and every generated token but the last (never fed back), fp32
    assert generation.kv_cache_bytes == 2 * layers * kv_heads * config.head_dim * (12 + 20 - 1) * 4


def test_models_alternate_and_warmup_runs_are_discarded(tokenizer):
    """A fake clock advanced by each model's forward passes: 2 s (baseline) or 1 s (candidate) per pass, 50 s in
    the warmup runs; the statistics must see only the kept runs' exact times."""
    settings = LatencySettings(runs=5, warmup=2, prompt_tokens=4, new_tokens=3, prefill_tokens=8)
    loop_passes = 1 + (settings.new_tokens - 1)  # prompt, decode steps
    passes_per_run = loop_passes + 1 + settings.new_tokens  # the loop, the long prefill, generate
    models = {"baseline": tiny_model("llama-gqa"), "candidate": tiny_model("llama-gqa", seed=1)}
    now, calls = [0.0], []

    def pass_cost(name: str, seconds: float):
        def advance(module, args, kwargs):
            run = sum(call == name for call in calls) // passes_per_run
            calls.append(name)
            now[0] += 50.0 if run < settings.warmup else seconds
        return advance

    for name, seconds in (("baseline", 2.0), ("candidate", 1.0)):
        models[name].register_forward_pre_hook(pass_cost(name, seconds), with_kwargs=True)
    results = measure(models, tokenizer, settings, clock=lambda: now[0])

    blocks = calls[::passes_per_run]
    assert blocks == [name for run in range(settings.runs) for name in run_order(list(models), run)]
    assert blocks[:4] == ["baseline", "candidate", "candidate", "baseline"]
    for name, seconds in (("baseline", 2.0), ("candidate", 1.0)):
        r = results[name]
        assert r["raw"]["end_to_end_s"] == [150.0] * 2 + [3 * seconds] * 3  # warmup runs kept in raw only
        assert r["end_to_end_s"] == {"mean": 3 * seconds, "std": 0.0}
        assert r["prefill_s"]["mean"] == seconds
        assert r["decode_ms_per_token"]["mean"] == 1000 * seconds
        assert r["prefill_tokens_per_s"] == {"prompt_tokens": 8, "mean": 8 / seconds, "std": 0.0}
        assert r["raw"]["generate_s"] == [150.0] * 2 + [3 * seconds] * 3  # 3 passes: exactly new_tokens tokens
        assert r["generate"] == {"end_to_end_s": {"mean": 3 * seconds, "std": 0.0}, "new_tokens": 3,
                                 "same_tokens_as_loop": True}
        assert r["params"] == sum(p.numel() for p in models[name].parameters())
    for metric in ("end_to_end_s", "generate_s"):
        kept = [results[name]["raw"][metric][settings.warmup:] for name in models]
        assert speedup_stats(*kept) == {"mean": 2.0, "std": 0.0, "ratio_of_means": 2.0, "runs": 3}


def test_speedup_statistics_on_known_numbers():
    stats = speedup_stats([2.0, 3.0, 4.0], [1.0, 2.0, 2.0])  # per-run speedups 2, 1.5, 2
    assert stats["mean"] == pytest.approx(11 / 6)
    assert stats["std"] == pytest.approx(statistics.stdev([2.0, 1.5, 2.0]))  # sample std, 0.2887
    assert stats["ratio_of_means"] == pytest.approx(9 / 5)
    assert stats["runs"] == 3
    with pytest.raises(ValueError):
        speedup_stats([1.0, 2.0], [1.0])


@pytest.fixture
def pruned_dir(tiny_dirs, tmp_path):
    """The tiny GQA model with one layer removed, saved as mop saves checkpoints (mop.json naming its source)."""
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    remove_layer(loaded.model, loaded.adapter, 3)
    out = tmp_path / "pruned"
    save_checkpoint(loaded, loaded.model, out, {"source": {"name": loaded.name, "sha256": loaded.weights_sha256}})
    return out


def test_bench_times_checkpoint_against_its_source(pruned_dir, tiny_dirs, tmp_path):
    output = tmp_path / "results" / "bench.json"
    assert main(["bench", str(pruned_dir), "--output", str(output), *TINY_BENCH]) == 0
    record = json.loads(output.read_text())
    assert record["settings"] == {"runs": 3, "warmup": 1, "prompt_tokens": 6, "new_tokens": 4, "prefill_tokens": 16,
                                  "time_generate": True}
    assert len(record["prompt"]["ids"]) == 6
    assert record["dtype"] == "float32" and record["torch_threads"] == torch.get_num_threads()
    assert record["device"].endswith("logical cores")  # a CPU description
    assert record["versions"]["torch"] == importlib.metadata.version("torch")
    baseline, candidate = record["models"]["baseline"], record["models"]["candidate"]
    assert baseline["name"] == str(tiny_dirs["llama-gqa"]) and candidate["name"] == str(pruned_dir)
    assert baseline["params"] - candidate["params"] == sum(
        p.numel() for p in tiny_model("llama-gqa").model.layers[3].parameters())
    assert baseline["memory"]["kv_cache_bytes"] * 5 == candidate["memory"]["kv_cache_bytes"] * 6  # 6 vs 5 layers
    assert baseline["memory"]["weight_bytes"] == 4 * baseline["params"]  # fp32
    for r in (baseline, candidate):
        raw = {metric: values[1:] for metric, values in r["raw"].items()}  # the kept runs
        assert all(len(values) == 3 - 1 for values in raw.values())
        assert r["end_to_end_s"]["mean"] == pytest.approx(statistics.mean(raw["end_to_end_s"]))
        decode_ms, prefill_rate = [1000 * s / 3 for s in raw["decode_s"]], [16 / s for s in raw["long_prefill_s"]]
        assert r["decode_ms_per_token"]["mean"] == pytest.approx(statistics.mean(decode_ms))
        assert r["prefill_tokens_per_s"]["mean"] == pytest.approx(statistics.mean(prefill_rate))
        # generate timed too: exactly new_tokens tokens, the loop's tokens
        assert r["generate"]["end_to_end_s"]["mean"] == pytest.approx(statistics.mean(raw["generate_s"]))
        assert r["generate"]["new_tokens"] == 4 and r["generate"]["same_tokens_as_loop"] is True
    for key, metric in [("speedup", "end_to_end_s"), ("decode_speedup", "decode_s"),
                        ("generate_speedup", "generate_s")]:
        kept = [r["raw"][metric][1:] for r in (baseline, candidate)]
        assert record[key]["of"] == metric
        assert record[key]["mean"] == pytest.approx(statistics.mean(b / c for b, c in zip(*kept)))
        assert record[key]["ratio_of_means"] == pytest.approx(statistics.mean(kept[0]) / statistics.mean(kept[1]))


def test_bench_dense_model_alone_and_explicit_baseline(pruned_dir, tiny_dirs, tmp_path):
    alone = tmp_path / "alone.json"
    assert main(["bench", str(tiny_dirs["llama-gqa"]), "--output", str(alone), *TINY_BENCH]) == 0
    record = json.loads(alone.read_text())
    assert list(record["models"]) == ["candidate"]
    assert record["speedup"] is None and record["decode_speedup"] is None and record["generate_speedup"] is None
    assert record["models"]["candidate"]["generate"]["new_tokens"] == 4
    no_generate = tmp_path / "no-generate.json"
    assert main(["bench", str(tiny_dirs["llama-gqa"]), "--output", str(no_generate), *TINY_BENCH, "--no-generate"]) == 0
    assert json.loads(no_generate.read_text())["models"]["candidate"]["generate"] is None

    explicit = tmp_path / "explicit.json"
    other = tiny_dirs["mistral"]  # same hidden size and tokenizer, another model
    assert main(["bench", str(pruned_dir), "--baseline", str(other), "--output", str(explicit), *TINY_BENCH]) == 0
    assert json.loads(explicit.read_text())["models"]["baseline"]["name"] == str(other)


@pytest.mark.parametrize("case", ["warmup>=runs", "not a model", "corrupt mop.json", "output is a directory"])
def test_bench_bad_input(case, pruned_dir, tmp_path, capsys):
    output, model, extra = tmp_path / "bench.json", str(pruned_dir), []
    if case == "warmup>=runs":
        extra = ["--runs", "5", "--warmup", "5"]
    elif case == "not a model":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "corrupt mop.json":
        (pruned_dir / "mop.json").write_text("{not json")
    else:
        output.mkdir()
    assert main(["bench", model, "--output", str(output), *TINY_BENCH, *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bars
    assert len(errors) == 1 and errors[0].startswith("mop: error: ")
    assert not output.is_file() and not output.with_name("bench.json.partial").exists()


def test_benchmark_refuses_models_in_different_dtypes(tiny_dirs):
    candidate = load_model(str(tiny_dirs["llama-gqa"]), dtype="float32")
    baseline = load_model(str(tiny_dirs["llama-gqa"]), dtype="bfloat16")
    with pytest.raises(MopError, match="share device and dtype"):
        benchmark(candidate, baseline, LatencySettings(runs=3, warmup=1))
