"""The latency model: the fit recovers known per-unit costs from a fake clock, keeps every coefficient ≥ 0, the
cache is read back and keyed by context, predicted speedups of real tiny checkpoints are ordered as measured,
and bad input is refused."""

import json
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig

import mop.latency.model
from conftest import TINY, VOCAB, random_model
from mop.errors import MopError
from mop.latency import LatencySettings, ModelShape, checkpoint_shape, fit_latency_model, measure, model_shape
from mop.latency.model import (QUANTITIES, Coefficients, LatencyModel, ShapeTiming, cache_path, config_shape,
                               features, measure_latency_model, measurement_context, nonnegative_least_squares,
                               synthetic_model, synthetic_shapes)
from mop.models import load_model

SETTINGS = LatencySettings(runs=3, warmup=1, prompt_tokens=4, new_tokens=3, prefill_tokens=8)
COSTS = Coefficients(fixed=0.5, per_layer=0.25, per_query_head=0.03, per_kv_head=0.07, per_neuron=0.001)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads wait on each other behind other processes
    (a tiny forward pass took 1 s instead of 6 ms), which makes these timings slow and noisy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(family: str = "llama-gqa"):
    config = TINY[family]()
    config.vocab_size = VOCAB
    return config


def fake_clock(costs: Coefficients, slowness: list[float] | None = None):
    """A clock that advances, at every forward pass of a causal LM, by `costs` applied to its shape: `fixed` at the
    model's call, and each decoder layer's cost at that layer's call, times `slowness[0]` (the machine's, 1 when
    not given). Returns the clock and the hook's handle."""
    now = [0.0]
    factor = slowness or [1.0]

    def advance(module: nn.Module, args) -> None:
        name = type(module).__name__
        if name.endswith("ForCausalLM"):
            now[0] += factor[0] * costs.fixed
        elif name.endswith("DecoderLayer"):
            attention, head_dim = module.self_attn, module.self_attn.head_dim
            now[0] += factor[0] * (costs.per_layer + costs.per_query_head * (attention.q_proj.out_features // head_dim)
                       + costs.per_kv_head * (attention.k_proj.out_features // head_dim)
                       + costs.per_neuron * module.mlp.gate_proj.out_features)

    handle = nn.modules.module.register_module_forward_pre_hook(advance)
    return (lambda: now[0]), handle


@pytest.fixture
def faked():
    clock, handle = fake_clock(COSTS)
    yield clock
    handle.remove()


def exact_timings(costs: Coefficients, shapes: list[ModelShape]) -> list[ShapeTiming]:
    return [ShapeTiming(s, {q: costs.seconds(s) for q in QUANTITIES}) for s in shapes]


def test_fit_on_a_fake_clock_recovers_the_per_unit_costs(faked, tmp_path):
    """Synthetic models timed by the protocol on a clock with known costs: decode and prefill recover them (one
    forward pass each), end-to-end recovers new_tokens times them (the prompt pass and new_tokens − 1 steps)."""
    model = measure_latency_model(tiny_config(), SETTINGS, cache=tmp_path, clock=faked)
    expected = {"decode": asdict(COSTS), "prefill": asdict(COSTS),
                "end_to_end": {k: SETTINGS.new_tokens * v for k, v in asdict(COSTS).items()}}
    for quantity in QUANTITIES:
        assert asdict(model.coefficients[quantity]) == pytest.approx(expected[quantity], rel=1e-9, abs=1e-12)
    assert max(model.record()["max_abs_relative_error"].values()) < 1e-9
    dense = config_shape(tiny_config())
    assert model.decode_seconds(dense) == pytest.approx(0.5 + 6 * (0.25 + 0.03 * 4 + 0.07 * 2 + 0.001 * 96))


def test_shapes_timed_in_groups_are_rescaled_by_the_dense_shape(tmp_path, monkeypatch):
    """Shapes too heavy to time together go in groups, each with the dense shape; a machine that runs slower at
    every group (the g-th group g times as slow) is rescaled away by the dense shape's times, so the fit still
    recovers the costs exactly. Without the rescaling the later groups' shapes look g times as slow."""
    monkeypatch.setattr(mop.latency.model, "GROUP_BYTES_FACTOR", 1.5)
    slowness, groups = [0.0], []
    measure_on = mop.latency.model.measure_on

    def slower_every_group(models, *args):
        slowness[0] += 1
        groups.append(list(models))
        return measure_on(models, *args)

    monkeypatch.setattr(mop.latency.model, "measure_on", slower_every_group)
    clock, handle = fake_clock(COSTS, slowness)
    try:
        model = measure_latency_model(tiny_config(), SETTINGS, cache=tmp_path, clock=clock)
    finally:
        handle.remove()
    dense = config_shape(tiny_config()).label()
    assert len(groups) >= 3 and all(group[0] == dense for group in groups)
    assert sorted(sum((group[1:] for group in groups), [])) == sorted(s.label() for s in
                                                                      synthetic_shapes(config_shape(tiny_config()))[1:])
    assert asdict(model.coefficients["decode"]) == pytest.approx(asdict(COSTS), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("family", sorted(TINY))
def test_synthetic_shapes_are_built_exactly_and_identify_the_coefficients(family):
    dense = config_shape(tiny_config(family))
    shapes = synthetic_shapes(dense)
    assert shapes[0] == dense and len(set(shapes)) == len(shapes)
    for shape in shapes:
        assert model_shape(synthetic_model(tiny_config(family), shape, "cpu", "float32")) == shape
    fitted = fit_latency_model(exact_timings(COSTS, shapes))
    assert asdict(fitted.coefficients["decode"]) == pytest.approx(asdict(COSTS), rel=1e-9)


def test_fit_keeps_coefficients_non_negative_at_the_constrained_optimum():
    """Timings made with a negative KV-head cost: plain least squares returns it negative; the fit sets it to 0
    and is optimal under the constraint (no zero coefficient could lower the error by growing)."""
    shapes = synthetic_shapes(ModelShape(layers=8, heads=6, kv_heads=2, head_dim=16, intermediate=64, hidden=64,
                                         vocab=512))
    signed = replace(COSTS, per_kv_head=-0.02)
    timings = exact_timings(signed, shapes)
    design = torch.tensor([features(s) for s in shapes], dtype=torch.float64)
    target = torch.tensor([t.seconds["decode"] for t in timings], dtype=torch.float64)
    assert torch.linalg.lstsq(design, target.unsqueeze(1)).solution[3, 0] < 0
    fitted = fit_latency_model(timings).coefficients["decode"]
    assert min(asdict(fitted).values()) >= 0 and fitted.per_kv_head == 0
    x = nonnegative_least_squares(design, target)
    gradient = design.T @ (target - design @ x)  # −½ d‖a x − b‖² / dx
    assert (gradient[x == 0] <= 1e-9).all() and gradient[x > 0].abs().max() < 1e-9


def test_unit_latency_is_the_saving_of_one_unit():
    model = fit_latency_model(exact_timings(COSTS, synthetic_shapes(config_shape(tiny_config()))))
    shape = ModelShape(layers=5, heads=6, kv_heads=3, head_dim=16, intermediate=80, hidden=64, vocab=512)
    units = model.unit_latency(shape, of="decode")
    seconds = model.decode_seconds
    assert units.layer == pytest.approx(seconds(shape) - seconds(replace(shape, layers=4)))
    assert units.kv_group == pytest.approx(seconds(shape) - seconds(replace(shape, heads=4, kv_heads=2)))
    assert units.neuron == pytest.approx(seconds(shape) - seconds(replace(shape, intermediate=79)))
    assert units.kv_group == pytest.approx(5 * (0.07 + 2 * 0.03))
    smaller = replace(shape, layers=2)
    assert model.speedup(shape, smaller, of="decode") == pytest.approx(seconds(shape) / seconds(smaller))
    assert LatencyModel.from_record(model.record()).coefficients == model.coefficients


def test_cache_is_read_back_and_keyed_by_device_dtype_and_engine(faked, tmp_path, monkeypatch):
    config = tiny_config()
    first = measure_latency_model(config, SETTINGS, cache=tmp_path, clock=faked)
    assert len(list(tmp_path.glob("*.json"))) == 1

    def no_clock() -> float:
        raise AssertionError("timed again instead of reading the cache")

    again = measure_latency_model(config, SETTINGS, cache=tmp_path, clock=no_clock)
    assert again.coefficients == first.coefficients and again.record() == first.record()
    # another dtype, another device: measured again, into another file
    bf16 = measure_latency_model(config, SETTINGS, dtype="bfloat16", cache=tmp_path, clock=faked)
    assert bf16.context["dtype"] == "bfloat16" and len(list(tmp_path.glob("*.json"))) == 2
    monkeypatch.setattr(mop.latency.model, "describe_device", lambda device: "another machine")
    moved = measure_latency_model(config, SETTINGS, cache=tmp_path, clock=faked)
    assert moved.context["device"] == "another machine" and len(list(tmp_path.glob("*.json"))) == 3
    context = measurement_context(config, SETTINGS, "cpu", "float32", "transformers")
    assert cache_path(context, tmp_path) != cache_path({**context, "engine": "vllm"}, tmp_path)


def test_vllm_fit_reads_the_served_checkpoints_and_recovers_the_costs(tmp_path, monkeypatch, tokenizer):
    """The vLLM engine without vLLM: a fake `time_in_vllm` reads each synthetic checkpoint's config.json (so the
    checkpoints must be written with exactly their shapes, tokenizer included) and returns the worker's raw runs
    from known costs, the warmup runs slowed down tenfold. The fit recovers the costs, so decode, prefill and
    end-to-end are read from the right runs (decode = (end-to-end − first token) / (new_tokens − 1)), and the
    warmup runs are dropped. The model is cached under its own engine's context."""
    import mop.latency.vllm_bench as vllm_bench

    first_token, prefill = 0.2, 3.0  # a 1-token request on the short and on the long prompt, in units of COSTS
    served = []

    def fake_time_in_vllm(directories, prompt, settings, dtype, python, prefill_prompt=None, max_model_len=512):
        assert prompt == list(range(SETTINGS.prompt_tokens)) and len(prefill_prompt) == SETTINGS.prefill_tokens
        raw = {}
        for label, directory in directories.items():
            config = json.loads((directory / "config.json").read_text())
            assert (directory / "tokenizer.json").is_file() and config["dtype"] == dtype
            shape = ModelShape(config["num_hidden_layers"], config["num_attention_heads"],
                               config["num_key_value_heads"], config["head_dim"], config["intermediate_size"],
                               config["hidden_size"], config["vocab_size"])
            assert shape.label() == label
            served.append(shape)
            unit = COSTS.seconds(shape)
            runs = [10.0] * settings.warmup + [1.0] * (settings.runs - settings.warmup)
            raw[label] = {"first_token_s": [r * first_token * unit for r in runs],
                          "end_to_end_s": [r * (first_token + settings.new_tokens - 1) * unit for r in runs],
                          "prefill_s": [r * prefill * unit for r in runs]}
        return {"raw": raw, "ok": True}

    monkeypatch.setattr(vllm_bench, "time_in_vllm", fake_time_in_vllm)
    monkeypatch.setattr(vllm_bench, "vllm_python", lambda: tmp_path / "python")
    monkeypatch.setattr(vllm_bench, "vllm_version", lambda python=None: "0.0-fake")
    config = tiny_config("mistral")
    model = measure_latency_model(config, SETTINGS, engine="vllm", tokenizer=tokenizer, cache=tmp_path)
    assert sorted(s.label() for s in set(served)) == sorted(s.label() for s in synthetic_shapes(config_shape(config)))
    expected = {"decode": asdict(COSTS), "prefill": {k: prefill * v for k, v in asdict(COSTS).items()},
                "end_to_end": {k: (first_token + SETTINGS.new_tokens - 1) * v for k, v in asdict(COSTS).items()}}
    for quantity in QUANTITIES:
        assert asdict(model.coefficients[quantity]) == pytest.approx(expected[quantity], rel=1e-9, abs=1e-12)
    assert model.context["engine"] == "vllm" and model.context["versions"] == {"vllm": "0.0-fake"}
    served_once = len(served)
    again = measure_latency_model(config, SETTINGS, engine="vllm", tokenizer=tokenizer, cache=tmp_path)
    assert again.record() == model.record() and len(served) == served_once  # read from the cache
    assert len(list(tmp_path.glob("*.json"))) == 1


@pytest.fixture(scope="module")
def depth_checkpoints(tmp_path_factory, tokenizer):
    """A random 8-layer LLaMA and its 4- and 2-layer versions, saved as checkpoints."""
    root = tmp_path_factory.mktemp("depths")
    dirs = {}
    for layers in (8, 4, 2):
        config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             intermediate_size=256, num_hidden_layers=layers, tie_word_embeddings=True)
        random_model(config).save_pretrained(root / f"L{layers}")
        tokenizer.save_pretrained(root / f"L{layers}")
        dirs[layers] = root / f"L{layers}"
    return dirs


def test_predicted_speedups_of_checkpoints_are_ordered_as_measured(depth_checkpoints, tmp_path):
    settings = LatencySettings(runs=6, warmup=2, prompt_tokens=4, new_tokens=16, prefill_tokens=32,
                               time_generate=False)
    loaded = {layers: load_model(str(directory)) for layers, directory in depth_checkpoints.items()}
    dense = loaded[8]
    model = measure_latency_model(dense.adapter.text_config(dense.model), settings, cache=tmp_path)
    shapes = {layers: checkpoint_shape(str(directory)) for layers, directory in depth_checkpoints.items()}
    assert {layers: shape.layers for layers, shape in shapes.items()} == {8: 8, 4: 4, 2: 2}
    assert shapes[2] == model_shape(loaded[2].model, loaded[2].adapter)
    predicted = {layers: model.speedup(shapes[8], shapes[layers]) for layers in (4, 2)}
    timed = measure({f"L{layers}": m.model for layers, m in loaded.items()}, dense.tokenizer, settings)
    seconds = {int(name[1:]): result["end_to_end_s"]["mean"] for name, result in timed.items()}
    measured = {layers: seconds[8] / seconds[layers] for layers in (4, 2)}
    assert 1 < predicted[4] < predicted[2] and 1 < measured[4] < measured[2]


def test_bad_input_is_refused():
    config = tiny_config()
    shapes = synthetic_shapes(config_shape(config))
    with pytest.raises(MopError, match="cannot fit 5 coefficients"):
        fit_latency_model(exact_timings(COSTS, shapes[:4]))
    with pytest.raises(MopError, match="do not identify"):
        fit_latency_model(exact_timings(COSTS, [replace(shapes[0], intermediate=i) for i in range(10, 80, 10)]))
    broken = exact_timings(COSTS, shapes)
    broken[2] = ShapeTiming(shapes[2], {**broken[2].seconds, "decode": -1.0})
    with pytest.raises(MopError, match="positive finite time"):
        fit_latency_model(broken)
    with pytest.raises(MopError, match="share head_dim, hidden and vocab"):
        fit_latency_model(exact_timings(COSTS, [*shapes[:-1], replace(shapes[-1], hidden=32)]))
    with pytest.raises(MopError, match="not a model shape"):
        fit_latency_model(exact_timings(COSTS, [replace(shapes[0], heads=3), *shapes[1:]]))
    with pytest.raises(MopError, match="needs the model's tokenizer"):
        measure_latency_model(config, SETTINGS, engine="vllm")
    with pytest.raises(MopError, match="unknown engine"):
        measure_latency_model(config, SETTINGS, engine="tensorrt")
    with pytest.raises(MopError, match="unknown dtype"):
        measure_latency_model(config, SETTINGS, dtype="int8")
    with pytest.raises(MopError, match="warmup"):
        measure_latency_model(config, replace(SETTINGS, warmup=2))
    model = fit_latency_model(exact_timings(COSTS, shapes))
    with pytest.raises(MopError, match="unknown latency quantity"):
        model.speedup(shapes[0], shapes[1], of="throughput")
