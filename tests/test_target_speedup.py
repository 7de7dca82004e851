"""Pruning to a speed (`--target-speedup`): width steps matched in predicted latency, every method stopping at
the first step predicted as fast as asked, a killed run resuming bitwise, bad speeds refused before any work,
and `mop compare` ranking methods at equal speed. A latency model with known coefficients is given as a record
(`--latency-model`), so nothing is timed."""

import json
import subprocess
from dataclasses import asdict, replace

import pytest

from conftest import TINY, VOCAB
from mop.cli import main
from mop.compare import run_compare
from mop.errors import MopError
from mop.latency.model import (QUANTITIES, Coefficients, LatencyModel, ShapeTiming, checkpoint_shape, config_shape,
                               fit_latency_model, synthetic_shapes)
from mop.modelcard import add_results
from mop.models import load_model, weights_sha256
from mop.pruning.search import Search, SearchConfig
from mop.pruning.targets import layers_shape
from test_resume_and_errors import (SMALL, assert_same_run, iterations_logged, kill_part_way, prune_command,
                                    run_error)

# a fixed cost as large as one layer, and widths that cost: one layer out of 6 is predicted 1.15× faster
COSTS = Coefficients(fixed=0.5, per_layer=0.2, per_query_head=0.03, per_kv_head=0.05, per_neuron=0.002)


def latency_record(family: str, costs: Coefficients = COSTS) -> dict:
    """The record of a latency model whose predictions are exactly `costs` (fitted on exact timings)."""
    config = TINY[family]()
    config.vocab_size = VOCAB
    dense = config_shape(config)
    timings = [ShapeTiming(s, {q: costs.seconds(s) for q in QUANTITIES}) for s in synthetic_shapes(dense)]
    return fit_latency_model(timings, {"dense_shape": asdict(dense), "device": "fake"}).record()


@pytest.fixture
def latency_file(tmp_path):
    def write(family: str = "llama-gqa", costs: Coefficients = COSTS):
        path = tmp_path / f"latency-{family}.json"
        path.write_text(json.dumps(latency_record(family, costs)))
        return path

    return write


def test_latency_matched_width_step_saves_what_the_depth_step_saves(tiny_dirs, latency_file, tmp_path):
    """Step after step (the accumulators carried), the width candidate's predicted saving is the depth
    candidate's — a layer with its fixed cost — within one neuron out of every layer (the MLP takes the rest);
    matched in parameters, as the paper does for `--target`, it is not."""
    for family in ("llama-gqa", "llama-mha"):
        loaded = load_model(str(tiny_dirs[family]))
        config = SearchConfig(targets=[], speedups=[1.2], latency_model=str(latency_file(family)), mode="width",
                              calib_samples=4, calib_max_length=32)
        search = Search(loaded, config, tmp_path / family)
        latency, dense = search.latency, search.goals.dense
        layer, n_layers = loaded.adapter.shape(loaded.model), dense.layers
        for _ in range(2):
            shape = layers_shape(dense, layer, n_layers)
            unit = latency.unit_latency(shape)
            depth_saving = latency.seconds(shape) - latency.seconds(replace(shape, layers=n_layers - 1))
            plan = search.plan(layer, n_layers, p_layer=0)  # the parameter budget is not used in latency
            after = plan.shape_after(layer)
            width_saving = latency.seconds(shape) - latency.seconds(layers_shape(dense, after, n_layers))
            assert plan.planned == pytest.approx(depth_saving) and width_saving == pytest.approx(plan.achieved)
            assert plan.achieved > 0 and abs(width_saving - depth_saving) <= unit.neuron / 2 + 1e-12, family
            search.latency = None  # the paper's matching, from the same shape and accumulators
            p_layer = layer.attention_params + layer.mlp_params + 2 * layer.hidden  # + the two norms
            params_saving = latency.seconds(shape) - latency.seconds(
                layers_shape(dense, search.plan(layer, n_layers, p_layer).shape_after(layer), n_layers))
            search.latency = latency
            assert abs(params_saving - depth_saving) > unit.neuron, family
            layer, search.carry, search.neuron_carry = after, plan.carry_out, plan.neuron_carry_out


def speed_args(latency, *speedups: str) -> list[str]:
    return [*(a for s in speedups for a in ("--target-speedup", s)), "--latency-model", str(latency)]


def test_killed_speed_run_stops_at_the_first_step_and_resumes_bitwise(tiny_dirs, latency_file, tmp_path):
    """Two speed targets and a compression target from one kl search; killed part-way and run again, the same
    run.json and weights. Each speed target is taken at the first iteration predicted at least as fast (the one
    before is predicted slower), and the search ends at the one that reaches the last target."""
    latency = latency_file()
    args = ["--target", "0.2", *speed_args(latency, "1.3", "1.6"), "--path-criterion", "kl", "--tune-steps", "1",
            "--seed", "3"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run(prune_command(tiny_dirs["llama-gqa"], whole, *args), check=True, capture_output=True)
    kill_part_way(prune_command(tiny_dirs["llama-gqa"], resumed, *args), resumed, iterations_logged(whole))
    subprocess.run(prune_command(tiny_dirs["llama-gqa"], resumed, *args), check=True, capture_output=True)
    assert_same_run(whole, resumed, ["target-20", "speedup-130", "speedup-160"])

    run_whole = json.loads((whole / "run.json").read_text())
    iterations, targets = run_whole["iterations"], run_whole["targets"]
    predictor = LatencyModel.from_record(json.loads(latency.read_text()))
    dense = checkpoint_shape(str(tiny_dirs["llama-gqa"]))
    for speedup, name in ((1.3, "speedup-130"), (1.6, "speedup-160")):
        at = targets[name]["iteration"]
        assert iterations[at - 1]["predicted_speedup"] >= speedup
        assert at == 1 or iterations[at - 2]["predicted_speedup"] < speedup
        provenance = json.loads((whole / name / "mop.json").read_text())
        assert provenance["target_speedup"] == speedup and "target" not in provenance
        assert provenance["predicted_speedup"] == pytest.approx(
            predictor.speedup(dense, checkpoint_shape(str(whole / name))))  # the checkpoint's own shape
        assert provenance["latency_model"]["coefficients"] == predictor.record()["coefficients"]
    assert len(iterations) == max(targets[n]["iteration"] for n in targets)
    assert run_whole["identity"]["latency_model"] == predictor.digest()
    assert run_whole["identity"]["step_matching"] == "latency"


@pytest.mark.parametrize("args, message", [
    (["--target-speedup", "0.9"], "expected a speedup above 1, not '0.9'"),
    (["--target-speedup", "1"], "expected a speedup above 1"),
    (["--target-speedup", "2.5", "--mode", "depth"], "target speedup 2.5 cannot be reached by mode depth: at most"),
    (["--target-speedup", "4", "--method", "shortgpt"], "target speedup 4.0 cannot be reached by shortgpt: at most"),
    (["--target-speedup", "3", "--method", "llm-pruner"], "cannot be reached by llm-pruner: at most"),
    (["--target-speedup", "1.3", "--target-speedup", "1.301"], "share a checkpoint directory (speedup-130)"),
], ids=["below-one", "one", "depth", "shortgpt", "llm-pruner", "clash"])
def test_bad_speed_targets_are_refused_in_one_line_before_any_work(tiny_dirs, latency_file, tmp_path, capsys,
                                                                   args, message):
    """Depth keeps two of six layers: 0.5 + 6 × 0.612 s against 0.5 + 2 × 0.612 s, at most 2.42×; ShortGPT keeps
    one (3.75×); LLM-Pruner keeps a KV group and a neuron in each layer."""
    out = tmp_path / "out"
    line = run_error(capsys, "prune", str(tiny_dirs["llama-gqa"]), *args, "--latency-model", str(latency_file()),
                     "--out", str(out), *SMALL)
    assert message in line
    assert not out.exists()
    with pytest.raises(MopError, match="not above 1"):
        SearchConfig(targets=[], speedups=[0.9]).validate()
    with pytest.raises(MopError, match="give at least one --target or --target-speedup"):
        SearchConfig(targets=[]).validate()
    with pytest.raises(MopError, match="give --target-speedup too"):
        SearchConfig(targets=[0.2], latency_model=str(latency_file())).validate()
    with pytest.raises(MopError, match="no such file"):
        SearchConfig(targets=[], speedups=[1.2], latency_model=str(tmp_path / "missing.json")).validate()
    with pytest.raises(MopError, match="unknown latency engine"):
        SearchConfig(targets=[], speedups=[1.2], latency_engine="tensorrt").validate()
    for config in (SearchConfig(targets=[0.2], latency_engine="vllm"),
                   SearchConfig(targets=[], speedups=[1.2], latency_model=str(latency_file()), latency_engine="vllm")):
        with pytest.raises(MopError, match="--latency-engine measures the latency model of speed targets"):
            config.validate()


def test_a_compression_beside_a_speed_target_is_held_to_the_floor_of_latency_matched_steps(tiny_dirs, latency_file,
                                                                                          tmp_path, capsys):
    """With a speed target every width step is matched in latency, so a compression target beside it can go as
    far as those steps go: on the tiny GQA model 67.1% of all parameters, where steps matched in parameters stop
    at 50.2%. 0.7 is refused before any work; 0.6, out of reach of the paper's matching, is reached."""
    latency = latency_file()
    out = tmp_path / "out"
    line = run_error(capsys, "prune", str(tiny_dirs["llama-gqa"]), "--mode", "width", "--target", "0.7",
                     *speed_args(latency, "1.1"), "--out", str(out), *SMALL)
    assert "target 0.7 cannot be reached in mode width: at most 0.6714" in line and not out.exists()
    assert main(["prune", str(tiny_dirs["llama-gqa"]), "--mode", "width", "--target", "0.6",
                 *speed_args(latency, "1.1"), "--out", str(out), *SMALL]) == 0
    assert json.loads((out / "target-60" / "mop.json").read_text())["compression"] >= 0.6


def test_a_latency_model_of_another_shape_is_refused(tiny_dirs, latency_file, tmp_path, capsys):
    line = run_error(capsys, "prune", str(tiny_dirs["llama-gqa"]), "--target-speedup", "1.2", "--latency-model",
                     str(latency_file("llama-mha")), "--out", str(tmp_path / "out"))
    assert "the latency model was measured for L6 H6/KV6 I128, not for" in line


@pytest.mark.parametrize("method", [["--mode", "depth"], ["--mode", "width"], [], ["--method", "shortgpt"],
                                    ["--method", "llm-pruner"]], ids=["depth", "width", "mop", "shortgpt", "llm-pruner"])
def test_every_method_writes_a_speed_checkpoint(tiny_dirs, latency_file, tmp_path, method):
    """speedup-130/ beside target-20/: mop.json has the target and the predicted speedup, which is that of the
    checkpoint's own shape and at least 1.3; run.json lists both."""
    latency = latency_file()
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dirs["llama-gqa"]), "--out", str(out), "--target", "0.2",
                 *speed_args(latency, "1.3"), *method, *SMALL]) == 0
    predictor = LatencyModel.from_record(json.loads(latency.read_text()))
    provenance = json.loads((out / "speedup-130" / "mop.json").read_text())
    expected = predictor.speedup(checkpoint_shape(str(tiny_dirs["llama-gqa"])), checkpoint_shape(str(out / "speedup-130")))
    assert provenance["target_speedup"] == 1.3 and provenance["predicted_speedup"] == pytest.approx(expected)
    assert expected >= 1.3
    run = json.loads((out / "run.json").read_text())
    assert sorted(run["targets"]) == ["speedup-130", "target-20"]
    assert run["targets"]["speedup-130"]["predicted_speedup"] == provenance["predicted_speedup"]
    assert json.loads((out / "target-20" / "mop.json").read_text())["target"] == 0.2


def test_a_timed_checkpoint_gets_its_measured_speedup_beside_the_predicted(tiny_dirs, latency_file, tmp_path):
    """What `mop run` and `mop bench` do after timing a checkpoint (a bench record, here made up): the mop.json of
    a run with speed targets (every checkpoint has a predicted speedup) gains `measured_speedup`; that of a run
    without is left as it was."""
    record = lambda sha: {"models": {"candidate": {"weights_sha256": sha}, "baseline": {"name": "dense"}},
                          "speedup": {"of": "end_to_end_s", "mean": 1.27, "std": 0.03, "runs": 10},
                          "device": "cpu", "dtype": "float32", "protocol": "test",
                          "settings": {"prompt_tokens": 12, "new_tokens": 128}}
    measured = {"mean": 1.27, "std": 0.03, "engine": "transformers", "device": "cpu", "dtype": "float32"}
    for speed, expected in ((speed_args(latency_file(), "1.3"), measured), ([], None)):
        out = tmp_path / f"out-{len(speed)}"
        assert main(["prune", str(tiny_dirs["llama-gqa"]), "--out", str(out), "--target", "0.2", *speed,
                     "--mode", "depth", *SMALL]) == 0
        for directory in (d for d in out.iterdir() if (d / "mop.json").is_file()):
            before = json.loads((directory / "mop.json").read_text())
            add_results(directory, weights_sha256(directory), latency=record(weights_sha256(directory)))
            after = json.loads((directory / "mop.json").read_text())
            assert after == (before if expected is None else {**before, "measured_speedup": expected}), directory


def test_a_speed_predicted_for_vllm_is_measured_in_vllm(tiny_dirs, tmp_path):
    """A checkpoint whose speed a vLLM latency model predicted: a transformers bench record leaves its mop.json
    alone, a vLLM one (`mop bench --engine vllm`'s, made up here) writes `measured_speedup` with its engine; the
    report sets the vLLM speedup beside the prediction."""
    from mop.modelcard import record_measured_speedup
    from mop.report import _speedup_cell

    latency = tmp_path / "latency-vllm.json"
    record = latency_record("llama-gqa")
    record["context"]["engine"] = "vllm"
    latency.write_text(json.dumps(record))
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dirs["llama-gqa"]), "--out", str(out), *speed_args(latency, "1.3"),
                 "--mode", "depth", *SMALL]) == 0
    checkpoint = out / "speedup-130"
    before = json.loads((checkpoint / "mop.json").read_text())
    timed = {"models": {"candidate": {"weights_sha256": weights_sha256(checkpoint)}, "baseline": {"name": "dense"}},
             "speedup": {"of": "end_to_end_s", "mean": 1.27, "std": 0.03, "runs": 10}, "device": "cpu",
             "dtype": "float32", "protocol": "test", "settings": {"prompt_tokens": 12, "new_tokens": 128}}
    add_results(checkpoint, weights_sha256(checkpoint), latency=timed)
    assert json.loads((checkpoint / "mop.json").read_text()) == before
    served = {"engine": "vllm", "speedup": {"mean": 1.41, "std": 0.02}, "device": "cpu", "settings": {"dtype": "float32"}}
    record_measured_speedup(checkpoint, served)
    assert json.loads((checkpoint / "mop.json").read_text()) == {
        **before, "measured_speedup": {"mean": 1.41, "std": 0.02, "engine": "vllm", "device": "cpu", "dtype": "float32"}}
    row = {"predicted_speedup": 1.3, "predicted_in": "vllm", "speedup": 1.1, "vllm_speedup": 1.41}
    assert _speedup_cell([row]) == "1.41× (predicted 1.30× in vLLM)"
    assert _speedup_cell([{**row, "predicted_in": "transformers"}]) == "1.10× (predicted 1.30×)"


def test_a_resume_predicts_with_the_latency_model_the_run_began_with(tiny_dirs, latency_file, tmp_path,
                                                                      monkeypatch):
    """Without --latency-model the run measures one (here faked, counted); run again with a target added, it
    takes the record in run.json instead of measuring again (a cleared cache or a changed machine alike). Another
    run with `--latency-engine vllm` measures its model with that engine."""
    import mop.pruning.targets

    measured = []
    fake = LatencyModel.from_record(json.loads(latency_file().read_text()))
    monkeypatch.setattr(mop.pruning.targets, "measure_latency_model",
                        lambda config, device, dtype, engine, tokenizer: measured.append((device, dtype, engine))
                        or fake)
    out = tmp_path / "out"
    prune = lambda *speedups, out=out, more=(): main(["prune", str(tiny_dirs["llama-gqa"]), "--out", str(out),
                                                      "--mode", "depth", *more, *SMALL,
                                                      *(a for s in speedups for a in ("--target-speedup", s))])
    assert prune("1.2") == 0 and measured == [("cpu", "float32", "transformers")]
    assert prune("1.2", "1.5") == 0 and len(measured) == 1
    assert sorted(json.loads((out / "run.json").read_text())["targets"]) == ["speedup-120", "speedup-150"]
    assert prune("1.2", out=tmp_path / "vllm", more=("--latency-engine", "vllm")) == 0
    assert measured[1:] == [("cpu", "float32", "vllm")]


def test_parameter_targets_are_unchanged(tiny_dirs, tmp_path):
    """Without a speed target nothing of the latency model enters a run: no identity field, no header, no record."""
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dirs["llama-gqa"]), "--out", str(out), "--target", "0.2", *SMALL]) == 0
    run = json.loads((out / "run.json").read_text())
    assert "latency_model" not in run["identity"] and "step_matching" not in run["identity"]
    assert "latency_model" not in run["header"]
    assert all("predicted_speedup" not in r for r in run["iterations"])


def test_compare_ranks_methods_at_equal_speed(tiny_dirs, latency_file, tmp_path):
    """`mop compare --target-speedup`: every method's speedup-120, one report section headed by the speed, its
    methods ranked by quality, the predicted speedup beside the (here untimed) measured one."""
    from test_compare import tiny_config

    base = tiny_config(search=SearchConfig(targets=[], speedups=[1.2], latency_model=str(latency_file()),
                                           calib_samples=8, calib_max_length=64), recovery=None, tasks=["wikitext"])
    methods = {"depth": {"mode": "depth"}, "width": {"mode": "width"}, "shortgpt": {"method": "shortgpt"}}
    out = tmp_path / "cmp"
    results = run_compare(str(tiny_dirs["llama-gqa"]), base, methods, out)
    rows = {label: results["methods"][label]["checkpoints"]["speedup-120"][0] for label in methods}
    assert all(r["predicted_speedup"] >= 1.2 for r in rows.values())
    report = (out / "report.md").read_text()
    section = report.split("## 1.20× speedup")[1].split("##")[0]
    ranked = sorted(rows, key=lambda label: rows[label]["perplexity"])
    table = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][2:]
    assert table == ranked
    assert "(predicted 1." in section
    assert (out / "perplexity_vs_speedup.png").is_file()
    assert json.loads((out / "compare.json").read_text())["speedups"] == [1.2]
