"""The search loop: targets taken at the first iteration that reaches them (whenever they are added), the random
path (deterministic, never tunes or scores), the candidates' tuning subsets, the seed-independent calibration,
targets measured over the body, reachability that matches the width planner, and the data fallback."""

import json
import logging

import pytest
import torch

import mop.pruning.search as search_module
from mop.errors import MopError
from mop.models import count_params, embedding_params, layer_params, load_model
from mop.models.adapters import LayerShape
from mop.pruning.criteria import coin
from mop.pruning.search import Search, SearchConfig, fewest_params
from mop.training import LoraSettings

SMALL = dict(calib_samples=8, calib_max_length=64, path_samples=8, path_max_length=64, tune_steps_per_iteration=1,
             lora=LoraSettings(batch_size=4, micro_batch_size=2, max_length=128))
# llama-gqa, seed 2, random path: W D D D with all-parameter compressions 0.143, 0.260, 0.378, 0.496, so 0.2, 0.3
# and 0.4 are first reached at iterations 2, 3 and 4
SEED = 2


def new_search(directory, out, **options) -> Search:
    return Search(load_model(str(directory)), SearchConfig(**{**SMALL, **options}), out)


def without_seconds(value):
    """A JSON value with every timing field ("seconds") left out."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def run_files(directory) -> dict:
    """Every file of a run directory: JSON parsed without timings, anything else as bytes."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        content = path.read_bytes()
        files[str(path.relative_to(directory))] = without_seconds(json.loads(content)) if path.suffix == ".json" else content
    return files


# ---------------------------------------------------------------- targets


def test_target_added_to_a_finished_search_is_taken_where_first_reached(tiny_dirs, tmp_path):
    model = tiny_dirs["llama-gqa"]
    new_search(model, tmp_path / "whole", targets=[0.2, 0.3, 0.4], seed=SEED).run()
    grown = tmp_path / "grown"
    new_search(model, grown, targets=[0.2, 0.4], seed=SEED).run()
    assert not (grown / "target-30").exists()
    new_search(model, grown, targets=[0.2, 0.3, 0.4], seed=SEED).run()  # replays the log, computes nothing new

    whole = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert {name: r["iteration"] for name, r in whole["targets"].items()} == {"target-20": 2, "target-30": 3,
                                                                              "target-40": 4}
    provenance = json.loads((grown / "target-30" / "mop.json").read_text())
    assert provenance["reached_at_iteration"] == 3 and provenance["path"] == "WDD"
    assert provenance["params"] == whole["iterations"][2]["params"] < whole["iterations"][1]["params"]
    assert run_files(grown) == run_files(tmp_path / "whole")  # same run.json, same checkpoints, byte for byte


class Killed(BaseException):
    """A kill -9 at a chosen point (BaseException: nothing in mop catches it)."""


def kill_on_call(monkeypatch, module, name: str, call: int, before=None, after: bool = True):
    """Replace module.name so that its `call`-th call dies: after the original ran (`after`), or before it,
    once `before(*args)` has left what a kill at that point leaves."""
    original, calls = getattr(module, name), []

    def dying(*args, **kwargs):
        calls.append(args)
        if len(calls) != call:
            return original(*args, **kwargs)
        if before is not None:
            before(*args)
        if after:
            original(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(module, name, dying)


def partial_checkpoint(loaded, model, out, provenance):
    partial = out.with_name(out.name + ".partial")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")


def partial_json(path, payload):
    path.with_name(path.name + ".partial").write_text(json.dumps(payload)[:50])


KILLS = {  # where the process dies: (module, function, which call, what the kill leaves, whether the call completed)
    "creating-run-json": ("state", "write_json_atomic", 1, partial_json, False),
    "logging-iteration": ("state", "write_json_atomic", 3, partial_json, False),
    "after-iteration-logged": ("search", "save_checkpoint", 1, None, False),
    "writing-checkpoint": ("search", "save_checkpoint", 1, partial_checkpoint, False),
    "after-checkpoint-renamed": ("search", "save_checkpoint", 1, None, True),
    "listing-checkpoint": ("state", "write_json_atomic", 4, partial_json, False),
    "between-targets": ("search", "save_checkpoint", 2, None, False),
    "next-iteration": ("search", "release_freed_memory", 3, None, True),
}


@pytest.mark.parametrize("kill", sorted(KILLS))
def test_rerun_after_a_kill_ends_with_the_files_of_an_uninterrupted_run(tiny_dirs, tmp_path, monkeypatch, kill):
    import mop.pruning.state as state_module

    model, options = tiny_dirs["llama-gqa"], dict(targets=[0.2, 0.3], seed=SEED)
    new_search(model, tmp_path / "whole", **options).run()
    module, name, call, leaves, after = KILLS[kill]
    with monkeypatch.context() as patch:
        kill_on_call(patch, {"state": state_module, "search": search_module}[module], name, call, leaves, after)
        with pytest.raises(Killed):
            new_search(model, tmp_path / "killed", **options).run()
    new_search(model, tmp_path / "killed", **options).run()
    assert run_files(tmp_path / "killed") == run_files(tmp_path / "whole")


# ---------------------------------------------------------------- the random path


def test_random_path_is_the_seeds_coin_and_never_tunes_or_scores(tiny_dirs, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the random path tuned or scored a candidate")

    for name in ("train", "lora_attached", "build_reference"):
        monkeypatch.setattr(search_module, name, forbidden)
    monkeypatch.setattr(search_module.data, "load_examples", forbidden)
    assert "".join(coin(0, t) for t in range(1, 13)) == "DDWDWWWWDWWD"  # the coin of published runs stays put
    assert "".join(coin(1, t) for t in range(1, 13)) == "DDDDDWDDDDDD"
    runs = [new_search(tiny_dirs["mistral"], tmp_path / name, targets=[0.45], seed=0).run() for name in "ab"]
    for state in runs:
        assert "".join(r["choice"] for r in state.iterations) == "DDWD"
        for t, record in enumerate(state.iterations, 1):
            assert (record["choice"], record["decided_by"], record["scores"]) == (coin(0, t), "random", None)
    assert without_seconds(runs[0].iterations) == without_seconds(runs[1].iterations)


def test_candidates_share_a_tuning_subset_that_depends_on_the_seed(tiny_dirs, tmp_path, monkeypatch):
    """Both candidates of an iteration are tuned on the same rows; another seed draws other rows. The rows are
    the seed's business only: the calibration prompts and the path references are the same for every seed."""
    tuned = []
    monkeypatch.setattr(search_module, "train", lambda model, rows, *args, **kwargs: tuned.append(rows))
    searches = {seed: new_search(tiny_dirs["llama-gqa"], tmp_path / str(seed), targets=[0.2], seed=seed,
                                 path_criterion="kl", tune_steps_per_iteration=2) for seed in (0, 1)}
    subsets = {}
    for seed, search in searches.items():
        tuned.clear()
        search.step(search.model, 3)
        width_rows, depth_rows = tuned
        assert width_rows == depth_rows and len(width_rows) == 2 * 3 * SMALL["lora"].batch_size
        subsets[seed] = width_rows
    assert subsets[0] != subsets[1]

    first, second = searches[0], searches[1]
    assert len(first.calibration) == 2
    for a, b in zip(first.calibration, second.calibration, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    for a, b in zip(first.reference.batches, second.reference.batches, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
    for a, b in zip(first.reference.hidden, second.reference.hidden, strict=True):
        assert torch.equal(a, b)
    assert len(first.reference.hidden) == 2


# ---------------------------------------------------------------- what a target measures


def test_body_target_stops_at_the_first_iteration_reaching_it(tiny_dirs, tmp_path):
    """Embeddings are 15% of tiny llama-gqa: a 0.3 body target is reached at iteration 2 (0.306 of the body,
    0.260 of all), where a 0.3 target over all parameters needs iteration 3."""
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    original, embedded = count_params(loaded.model), embedding_params(loaded.model)
    body = lambda params: 1 - (params - embedded) / (original - embedded)
    state = Search(loaded, SearchConfig(targets=[0.3], seed=SEED, compression_of="body", **SMALL), tmp_path).run()
    assert len(state.iterations) == 2
    assert body(state.iterations[0]["params"]) < 0.3 <= body(state.iterations[1]["params"])
    assert state.iterations[1]["compression"] < 0.3
    provenance = json.loads((tmp_path / "target-30" / "mop.json").read_text())
    params = count_params(loaded.model)
    assert provenance["compression_of"] == "body" and provenance["params"] == params
    assert provenance["compression"] == 1 - params / original
    assert provenance["non_embedding_compression"] == body(params)
    whole = new_search(tiny_dirs["llama-gqa"], tmp_path / "all", targets=[0.3], seed=SEED).run()
    assert len(whole.iterations) == 3


def test_compression_of_on_the_command_line(tiny_dirs, tmp_path):
    from mop.cli import main

    out = tmp_path / "body"
    assert main(["prune", str(tiny_dirs["llama-gqa"]), "--out", str(out), "--target", "0.3", "--seed", str(SEED),
                 "--compression-of", "body", "--calib-samples", "8", "--calib-max-length", "64"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["compression_of"] == "body" and run["targets"]["target-30"]["iteration"] == 2


def test_reachability_is_measured_like_the_targets(tiny_dirs, tmp_path):
    """Depth keeps 2 of 6 layers: at most 0.566 of all parameters, 0.666 of the body."""
    with pytest.raises(MopError, match=r"mode depth: at most 0\.5662 \(of all parameters\)"):
        new_search(tiny_dirs["llama-gqa"], tmp_path / "a", targets=[0.6], mode="depth")
    search = new_search(tiny_dirs["llama-gqa"], tmp_path / "b", targets=[0.6], mode="depth", compression_of="body")
    floor = 217_920 - 4 * 30_848  # parameters, minus 4 layers of 30,848; 32,768 of them embeddings
    assert search.compression(floor) == pytest.approx(4 * 30_848 / (217_920 - 32_768))
    with pytest.raises(MopError, match=r"mode depth: at most 0\.6664 \(of non-embedding parameters\)"):
        new_search(tiny_dirs["llama-gqa"], tmp_path / "c", targets=[0.67], mode="depth", compression_of="body")


# ---------------------------------------------------------------- reachability of width mode

SMOLLM2 = LayerShape(576, 64, 3, 3, 1536, qkv_bias=False, mlp_bias=False)
SMOLLM2_LAYER, SMOLLM2_PARAMS = 3_540_096, 134_515_008


def test_width_floor_of_smollm2_keeps_attention():
    """One KV group of all 30 layers (8.8 M) costs more than a layer (3.54 M): width steps never prune attention,
    so width mode ends with every layer's attention and one neuron, at 59.16%, not at the 72.3% that one group
    and one neuron per layer would give."""
    assert 30 * SMOLLM2.group_params > SMOLLM2_LAYER
    floor = fewest_params("width", SMOLLM2, 30, SMOLLM2_LAYER, SMOLLM2_PARAMS)
    assert floor == SMOLLM2_PARAMS - 30 * 1535 * SMOLLM2.neuron_params
    assert 1 - floor / SMOLLM2_PARAMS == pytest.approx(0.59157, abs=1e-5)  # --mode width --target 0.65: refused
    rest = SMOLLM2_PARAMS - 30 * SMOLLM2_LAYER
    thinnest = 2 * 576 + SMOLLM2.group_params + SMOLLM2.neuron_params  # norms, one group, one neuron
    assert fewest_params("mop", SMOLLM2, 30, SMOLLM2_LAYER, SMOLLM2_PARAMS) == rest + 2 * thinnest
    assert fewest_params("depth", SMOLLM2, 30, SMOLLM2_LAYER, SMOLLM2_PARAMS) == rest + 2 * SMOLLM2_LAYER


def test_width_mode_reaches_exactly_the_planners_floor(tiny_dirs, tmp_path):
    """Tiny llama-gqa has SmolLM2's coarse attention (6 layers × 6,144 > 30,848 a layer): width mode stops at the
    floor the planner simulation predicts, and a target beyond it is refused before any work."""
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    adapter, model = loaded.adapter, loaded.model
    shape, layers, original = adapter.shape(model), adapter.layers(model), count_params(model)
    assert shape.group_params * len(layers) > layer_params(layers[0])
    floor = fewest_params("width", shape, len(layers), layer_params(layers[0]), original)
    most = 1 - floor / original
    assert 0.50 < most < 0.51
    with pytest.raises(MopError, match="cannot be reached in mode width"):
        Search(loaded, SearchConfig(targets=[0.6], mode="width", **SMALL), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    state = Search(loaded, SearchConfig(targets=[most - 1e-9], mode="width", **SMALL), tmp_path / "floor").run()
    assert count_params(model) == floor
    assert adapter.shape(model).kv_heads == shape.kv_heads and adapter.shape(model).intermediate == 1
    assert all(r["width_plan"]["groups_per_layer"] == 0 for r in state.iterations)


# ---------------------------------------------------------------- no data reachable


def test_fallback_to_text_sampled_from_the_model_is_deterministic(tiny_dirs, tmp_path, monkeypatch, caplog):
    """No data under MOP_DATA_DIR and no hub: calibration, path texts and tuning rows are sampled from the model,
    with warnings, and two runs (whatever the global RNG) give the same path and weights."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("MOP_DATA_DIR", str(empty))
    states = []
    for name, global_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(global_seed)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            states.append(new_search(tiny_dirs["llama-gqa"], tmp_path / name, targets=[0.2], path_criterion="kl",
                                     seed=1).run())
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("not under MOP_DATA_DIR" in w for w in warnings) == 3  # calibration, path texts, tuning rows
        assert sum("sampled from the model itself" in w for w in warnings) == 3
    first, second = states
    assert all(r["decided_by"] == "kl" for r in first.iterations)
    assert without_seconds(first.iterations) == without_seconds(second.iterations)
    assert run_files(tmp_path / "a") == run_files(tmp_path / "b")
