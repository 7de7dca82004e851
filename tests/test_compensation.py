"""Closed-form compensation of a cut (`mop.pruning.compensation`): exact where the cut units are linear in
the kept ones, a lower reconstruction error on held-out text for every method and family, recorded in
mop.json, and resumable bitwise."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_model
from mop import data
from mop.errors import MopError
from mop.models import load_model
from mop.models.adapters import adapter_for
from mop.pruning import methods
from mop.pruning.compensation import (DEFAULT_DEPTH_RIDGE, DEFAULT_RIDGE, CompensationSettings, Repair, cut,
                                      _Moments, depth_repair, depth_repair_errors, elimination_order,
                                      refit_columns, width_elimination_orders, width_repair)
from mop.pruning.search import Search, SearchConfig, calibration_batches
from mop.pruning.surgery import structural_copy

EXACT = CompensationSettings("lstsq", ridge=1e-9, depth_ridge=1e-9)  # next to no ridge: an exact fit is found exactly
CALIB = dict(calib="wikitext2-valid", calib_samples=32, calib_max_length=64, batch_size=8)
IDS = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(0))


def batches(tokenizer, spec: str = "alpaca", n: int = 16) -> list[data.Batch]:
    texts = data.sample(data.load_calibration(spec), n, 0)
    return data.text_batches(tokenizer, texts, 48, 4)


def random_batches(n: int = 16, length: int = 64) -> list[data.Batch]:
    """Random token ids: on a tiny random model their activations span every direction, so an exact linear
    dependence is identifiable (the tiny tokenizer's Alpaca prompts repeat a template and leave the Grams
    rank-deficient, where a least-squares fit is exact on the calibration only)."""
    ids = torch.randint(3, 500, (n, length), generator=torch.Generator().manual_seed(5))
    return [data.Batch(ids[i : i + 4], torch.ones_like(ids[i : i + 4])) for i in range(0, n, 4)]


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def no_cut(model, adapter) -> dict:
    return {"groups": [[] for _ in adapter.layers(model)], "neurons": [[] for _ in adapter.layers(model)]}


def test_refit_columns_solves_the_least_squares_problem():
    """Against least squares on explicit samples (ridge ~0): the same weights, and the errors (float32 diagnostics)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    x[:, 5] = 0.3 * x[:, 0] + 0.1 * torch.randn(400, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True, True, False])
    repaired, before, after = refit_columns(weight, x.T @ x / len(x), keep, 1e-12)
    solution = torch.linalg.lstsq(x[:, keep], x @ weight.T).solution.T
    torch.testing.assert_close(repaired[:, keep], solution, atol=1e-8, rtol=0)
    assert (repaired[:, ~keep] == 0).all()
    y = x @ weight.T
    assert before == pytest.approx(float(((x[:, keep] @ weight[:, keep].T - y) ** 2).sum() / (y**2).sum()), rel=1e-5)
    assert after == pytest.approx(float(((x[:, keep] @ solution.T - y) ** 2).sum() / (y**2).sum()), rel=1e-5)
    assert after < before


def test_a_neuron_that_is_a_multiple_of_a_kept_one_is_cut_without_loss(tokenizer):
    model = tiny_model("llama-gqa")
    adapter = adapter_for(model)
    mlp = adapter.layers(model)[2].mlp
    with torch.no_grad():  # neuron 7 computes 2.5 × neuron 3: silu(gate_7 x) · up_7 x = silu(gate_3 x) · 2.5 up_3 x
        mlp.gate_proj.weight[7] = mlp.gate_proj.weight[3]
        mlp.up_proj.weight[7] = 2.5 * mlp.up_proj.weight[3]
        mlp.down_proj.weight[:, 7] *= 20  # a neuron that matters
    width = no_cut(model, adapter)
    width["neurons"][2] = [7]
    dense = logits(model)
    plain, repaired = structural_copy(model), structural_copy(model)
    cut(plain, adapter, [], CompensationSettings(), width=width)
    records = cut(repaired, adapter, random_batches(), EXACT, width=width)
    torch.testing.assert_close(logits(repaired), dense, atol=1e-4, rtol=0)
    assert (logits(plain) - dense).abs().max() > 1e-2  # without the repair, the cut shows
    assert records[0]["layer"] == 2 and records[0]["module"] == "mlp.down_proj"
    assert records[0]["error_after"] < 1e-6 < records[0]["error_before"]


def test_a_head_that_duplicates_a_kept_one_is_cut_without_loss(tokenizer):
    model = tiny_model("llama-mha")  # MHA: a KV group is one head
    adapter = adapter_for(model)
    attention, d = adapter.layers(model)[1].self_attn, adapter.shape(model).head_dim
    with torch.no_grad():  # head 4 computes what head 1 computes
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
            proj.weight[4 * d : 5 * d] = proj.weight[1 * d : 2 * d]
    width = no_cut(model, adapter)
    width["groups"][1] = [4]
    dense = logits(model)
    plain, repaired = structural_copy(model), structural_copy(model)
    cut(plain, adapter, [], CompensationSettings(), width=width)
    cut(repaired, adapter, random_batches(), EXACT, width=width)
    torch.testing.assert_close(logits(repaired), dense, atol=1e-4, rtol=0)
    assert (logits(plain) - dense).abs().max() > 1e-2


class LinearInMLPOutput(nn.Module):
    """A decoder layer whose update is A·m, m being the previous layer's MLP output (read by a hook)."""

    def __init__(self, previous_mlp: nn.Module, hidden: int):
        super().__init__()
        self.update = nn.Linear(hidden, hidden, bias=False)
        nn.init.normal_(self.update.weight, std=0.3)
        self.seen: list[torch.Tensor] = []
        previous_mlp.register_forward_hook(lambda module, args, output: self.seen.__setitem__(slice(None), [output]))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.update(self.seen[0])


def test_a_removed_layer_linear_in_what_the_layer_before_writes_is_restored(tokenizer):
    def build() -> nn.Module:  # a fresh model each (the hook would not follow a structural copy)
        model = tiny_model("llama-gqa")
        layers = adapter_for(model).layers(model)
        torch.manual_seed(1)
        layers[3] = LinearInMLPOutput(layers[2].mlp, model.config.hidden_size)
        return model

    dense_model, plain, repaired = build(), build(), build()
    adapter = adapter_for(dense_model)
    dense = logits(dense_model)
    cut(plain, adapter, [], CompensationSettings(), layer=3)
    depth_only_exact = CompensationSettings("lstsq", ridge=1.0, depth_ridge=1e-9)  # a depth cut reads depth_ridge
    records = cut(repaired, adapter, random_batches(), depth_only_exact, layer=3)
    torch.testing.assert_close(logits(repaired), dense, atol=1e-4, rtol=0)
    assert (logits(plain) - dense).abs().max() > 1e-2
    assert records[0]["module"] == "2.mlp.down_proj" and records[0]["error_after"] < 1e-6 < records[0]["error_before"]


def test_the_repair_error_of_each_layer_is_what_its_depth_repair_leaves(monkeypatch):
    """`depth_repair_errors` (every layer in one pass, or in chunks when the Grams would not fit) gives, for each
    layer, the error its own `depth_repair` records; layer 0 scores its plain cut. A last layer built linear in
    what the layer before writes scores ~0, and `repair_error` picks the lowest among the layers it may remove."""
    from mop.pruning import compensation
    from mop.pruning.criteria import repair_error

    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    calibration = random_batches()
    errors = depth_repair_errors(model, adapter, calibration, 1e-3)
    for index in range(1, len(layers)):
        record = depth_repair(model, adapter, calibration, index, CompensationSettings("lstsq", depth_ridge=1e-3))
        assert errors[index].item() == pytest.approx(record.records[0]["error_after"], rel=1e-6)
    monkeypatch.setattr(compensation, "GRAM_BYTES", 1)  # one layer a pass
    torch.testing.assert_close(depth_repair_errors(model, adapter, calibration, 1e-3), errors, rtol=1e-9, atol=0)
    delta = out = 0.0  # layer 0, which no repair follows: its plain update's energy over its output's
    for batch in calibration:
        with torch.no_grad():
            hidden = model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states
        delta += (hidden[1] - hidden[0]).double().square().sum().item()
        out += hidden[1].double().square().sum().item()
    assert errors[0].item() == pytest.approx(delta / out, rel=1e-5)
    assert repair_error(model, adapter, calibration) == int(
        depth_repair_errors(model, adapter, calibration, DEFAULT_DEPTH_RIDGE)[:-2].argmin())

    torch.manual_seed(1)
    layers[-1] = LinearInMLPOutput(layers[-2].mlp, model.config.hidden_size)
    errors = depth_repair_errors(model, adapter, calibration, 1e-9)
    assert errors[-1] < 1e-6 and errors[-1] < errors[:-1].min() / 100


@pytest.mark.parametrize("criterion", ["layer_criterion", "width_criterion"])
def test_repair_error_needs_the_repair(criterion):
    with pytest.raises(MopError, match="repair_error"):
        SearchConfig(targets=[0.2], **{criterion: "repair_error"}).validate()
    SearchConfig(targets=[0.2], **{criterion: "repair_error"}, compensation="lstsq").validate()


@pytest.mark.parametrize("width", [1, 2])
def test_elimination_order_is_greedy_least_squares(width):
    """Each round of `elimination_order` removes the unit whose removal, beside the units removed before it and
    with every other column re-fitted from the original weight (`refit_columns`), leaves the least error: the
    inverse and weight updates it carries from round to round lose nothing. Units of `width` columns; the last
    column belongs to no unit (a bias's constant input) and is never removed."""
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(13, 13, generator=generator, dtype=torch.float64)  # correlated columns: re-fits matter
    x = torch.randn(500, 13, generator=generator, dtype=torch.float64) @ mixing
    x[:, 4] = 0.7 * x[:, 9] - 0.2 * x[:, 1] + 0.05 * torch.randn(500, generator=generator, dtype=torch.float64)
    x[:, 12] = 1.0
    gram = x.T @ x / len(x)
    weight = torch.randn(5, 13, generator=generator, dtype=torch.float64)
    units = torch.arange(12).view(-1, width)
    rank = elimination_order(weight, gram, units, 1e-12)
    removed = torch.zeros(13, dtype=torch.bool)
    for step in range(len(units)):
        alive = [u for u in range(len(units)) if not removed[units[u]].any()]

        def error(u: int) -> float:
            keep = ~removed.clone()
            keep[units[u]] = False
            return refit_columns(weight, gram, keep, 1e-12)[2]

        best = min(alive, key=error)
        assert rank[best] == step, (step, best, rank)
        removed[units[best]] = True
    assert sorted(rank.tolist()) == list(range(len(units)))


def test_width_repair_error_cuts_first_a_neuron_the_others_stand_in_for(tokenizer):
    """A large neuron that is a multiple of a kept one: AMP keeps it among the most important, the width
    criterion `repair_error` removes it (or its twin) first; heads and neurons of every layer get a full rank."""
    from mop.pruning.criteria import amp, repair_order

    model = tiny_model("llama-gqa")
    adapter = adapter_for(model)
    mlp = adapter.layers(model)[2].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[7] = mlp.gate_proj.weight[3]
        mlp.up_proj.weight[7] = 2.5 * mlp.up_proj.weight[3]
        mlp.down_proj.weight[:, 7] *= 20
    calibration = random_batches()
    shape = adapter.shape(model)
    scores = repair_order(model, adapter, calibration)
    assert min(scores[2].neurons[3], scores[2].neurons[7]) == 0
    assert amp(model, adapter, calibration)[2].neurons.argsort().tolist().index(7) > shape.intermediate // 2
    for layer in scores:
        assert sorted(layer.groups.tolist()) == list(range(shape.kv_heads))
        assert sorted(layer.neurons.tolist()) == list(range(shape.intermediate))
    orders = width_elimination_orders(model, adapter, calibration, None, DEFAULT_RIDGE)
    assert all(torch.equal(s.neurons, n) and torch.equal(s.groups, g) for s, (g, n) in zip(scores, orders))


def test_the_first_layer_is_removed_without_repair(tokenizer):
    model = tiny_model("llama-gqa")
    adapter = adapter_for(model)
    repair = depth_repair(model, adapter, batches(tokenizer), 0, EXACT)
    assert repair.weights == {} and "no layer before" in repair.records[0]["skipped"]


def test_a_repair_writes_into_no_shared_tensor(tokenizer):
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    before = {name: p.clone() for name, p in model.named_parameters()}
    copy = structural_copy(model)
    width = no_cut(model, adapter)
    width["groups"][2], width["neurons"][4] = [1], [5, 9]
    width_repair(copy, adapter, batches(tokenizer), width["groups"], width["neurons"], EXACT).apply(copy, adapter)
    depth_repair(copy, adapter, batches(tokenizer), 3, EXACT).apply(copy, adapter)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_width_grams_ride_on_the_scoring_pass(tiny_dirs, tmp_path):
    """A compensated width step runs no forward pass more than a plain one (the Grams are recorded while AMP
    scores), and the model it leaves is bitwise the one that a repair from passes of its own gives (what a
    resume replays)."""
    forwards = {}
    for compensation in ("none", "lstsq"):
        loaded = load_model(str(tiny_dirs["qwen2"]))
        search = Search(loaded, SearchConfig(targets=[0.2], mode="width", compensation=compensation, **CALIB),
                        tmp_path / compensation)
        model = structural_copy(loaded.model)
        calls = []
        handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
        record = search.step(model, 1)
        handle.remove()
        forwards[compensation] = len(calls)
    assert forwards["lstsq"] == forwards["none"] == len(search.calibration)
    replayed = structural_copy(loaded.model)
    cut(replayed, loaded.adapter, search.calibration, CompensationSettings("lstsq"), width=record["removed"])
    stepped = dict(model.named_parameters())
    for name, parameter in replayed.named_parameters():
        assert torch.equal(parameter, stepped[name]), name
    assert record["compensation"] and all(r["error_after"] < r["error_before"] for r in record["compensation"])


def test_a_width_step_by_repair_error_reads_the_grams_once_and_cuts_its_lowest_units(tiny_dirs, tmp_path):
    """With `--width-criterion repair_error` a compensated width step runs one pass over the calibration, whose
    Grams both rank the units and repair the cut; it removes the criterion's lowest units, and its repair leaves
    less error than AMP's cut of the same counts repaired alike."""
    from mop.pruning.criteria import repair_order
    from mop.pruning.width import WidthPlan, lowest_units

    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    records = {}
    for criterion in ("amp", "repair_error"):
        config = SearchConfig(targets=[0.2], mode="width", width_criterion=criterion, compensation="lstsq", **CALIB)
        search = Search(loaded, config, tmp_path / criterion)
        model = structural_copy(loaded.model)
        calls = []
        handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
        records[criterion] = search.step(model, 1)
        handle.remove()
        assert len(calls) == len(search.calibration)
    plan = WidthPlan(**records["repair_error"]["width_plan"])
    groups, neurons = lowest_units(repair_order(loaded.model, loaded.adapter, search.calibration), plan)
    assert records["repair_error"]["removed"] == {"groups": groups, "neurons": neurons}
    error = {c: sum(r["error_after"] for r in record["compensation"]) for c, record in records.items()}
    assert error["repair_error"] < error["amp"], error


def test_packed_calibration_is_windows_of_the_joined_text(tiny_dirs):
    """`--calib-packed`: `calib_samples` windows of exactly `calib_max_length` tokens, each a contiguous slice of
    the joined calibration text, every position real, the same draw every time; the option enters a run's
    identity only when set, and a text too short for one window is refused in one line."""
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    config = SearchConfig(targets=[0.2], calib="wikitext2-valid", calib_samples=6, calib_max_length=40,
                          calib_packed=True, batch_size=4)
    packed = calibration_batches(loaded, config)
    assert [tuple(b.input_ids.shape) for b in packed] == [(4, 40), (2, 40)]
    assert all(bool(b.attention_mask.all()) for b in packed)
    joined = torch.tensor(loaded.tokenizer("\n\n".join(data.load_calibration("wikitext2-valid")))["input_ids"])
    slices = joined.unfold(0, 40, 1)  # [N − 39, 40], every contiguous window
    for window in torch.cat([b.input_ids for b in packed]):
        assert bool((slices == window).all(1).any())
    again = calibration_batches(loaded, config)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(packed, again))
    assert "calib_packed" not in SearchConfig(targets=[0.2]).identity() and config.identity()["calib_packed"] is True
    with pytest.raises(MopError, match="too few"):
        data.packed_windows(loaded.tokenizer, ["a short text"], 2, 40, 0)


def held_out_error(model: nn.Module, dense_logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float((logits(model, ids) - dense_logits).square().mean())


def held_out_text(tokenizer) -> list[data.Batch]:
    """WikiText-2 test rows: the calibration is the validation split."""
    return data.text_batches(tokenizer, data.load_texts("wikitext2")[100:132], 64, 8)


@torch.no_grad()
def local_errors(model: nn.Module, adapter, repair: Repair, batches: list[data.Batch], run: range | None = None
                 ) -> tuple[float, float]:
    """The repaired modules' reconstruction error on `batches`, summed over modules: E‖target − output‖² with
    the plain cut (before) and with the repair (after). A width repair's target is the module's own output,
    its plain cut the output without the zeroed columns; a depth repair (layers `run` removed) targets the
    module's output plus the run's update, and its plain cut adds nothing."""
    layers = adapter.layers(model)
    totals = {"before": 0.0, "after": 0.0}
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for path, (weight, bias) in repair.weights.items():
        module = layers.get_submodule(path)

        def read(module, args, output, weight=weight, bias=bias):
            x = args[0]
            repaired = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
            if run is None:
                plain = F.linear(x * (weight != 0).any(0).to(x.dtype), module.weight, module.bias)
                seen.update(target=output, plain=plain, repaired=repaired)
                add()
            else:
                seen.update(output=output, repaired=repaired)

        handles.append(module.register_forward_hook(read))
    if run is not None:
        handles.append(layers[run.start].register_forward_hook(
            lambda m, args, kwargs, out: seen.update(run_in=args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))

        def close(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen.update(target=seen["output"] + out - seen["run_in"], plain=seen["output"])
            add()

        handles.append(layers[run.stop - 1].register_forward_hook(close))

    def add():
        totals["before"] += float((seen["target"] - seen["plain"]).double().square().sum())
        totals["after"] += float((seen["target"] - seen["repaired"]).double().square().sum())

    try:
        for batch in batches:  # padded positions count too, alike before and after
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return totals["before"], totals["after"]


@pytest.mark.parametrize("kind", ["width", "layer", "run", "last-run"])
def test_held_out_reconstruction_error_falls_for_every_cut_and_family(tiny_dirs, tokenizer, family, kind):
    """Every method cuts through `cut`: units of every layer (mop's width steps, LLM-Pruner), one layer (mop's
    depth steps), a run of layers (ShortGPT), the last layers included. Fitted on WikiText-2 validation
    text, the repaired modules reproduce their targets better on the test split than the plain cut does."""
    loaded = load_model(str(tiny_dirs[family]))
    model, adapter = loaded.model, loaded.adapter
    calibration = calibration_batches(loaded, SearchConfig(targets=[0.2], **CALIB))
    shape = adapter.shape(model)
    run = None
    if kind == "width":
        width = {"groups": [[i % shape.kv_heads] for i in range(6)],
                 "neurons": [list(range(i, shape.intermediate, 4)) for i in range(6)]}
        repair = width_repair(model, adapter, calibration, width["groups"], width["neurons"], CompensationSettings("lstsq"))
    else:
        run = {"layer": range(3, 4), "run": range(2, 4), "last-run": range(4, 6)}[kind]
        repair = depth_repair(model, adapter, calibration, run.start, CompensationSettings("lstsq"), len(run))
    before, after = local_errors(model, adapter, repair, held_out_text(tokenizer), run)
    assert after < before, (before, after)


@pytest.mark.parametrize("method, settings", [("mop", {"mode": "width"}), ("mop", {"mode": "depth"}),
                                              ("mop", {"mode": "mop", "seed": 1}), ("llm-pruner", {}),
                                              ("shortgpt", {})])
def test_every_method_records_its_repairs(tiny_dirs, tokenizer, tmp_path, method, settings):
    """Through each method on one family: the checkpoint's mop.json lists the repairs with errors that fall on
    the calibration text, and the checkpoint's logits move toward the dense model's on held-out text, except
    ShortGPT's: on a random tiny model it removes layer 0 (nothing before it to repair) and the last layers,
    whose update a linear map of the previous MLP output does not predict beyond the calibration text (the
    modules' own error falls there too: the test above)."""
    ids = held_out_text(tokenizer)[0].input_ids
    errors = {}
    for compensation in ("none", "lstsq"):
        loaded = load_model(str(tiny_dirs["llama-gqa"]))
        dense = logits(loaded.model, ids)
        out = tmp_path / compensation
        methods.prune(loaded, SearchConfig(targets=[0.3], method=method, compensation=compensation, **CALIB,
                                           **settings), out)
        errors[compensation] = held_out_error(load_model(str(out / "target-30")).model, dense, ids)
        record = json.loads((out / "target-30" / "mop.json").read_text())
        if compensation == "none":
            assert "compensation" not in record
        else:
            compensation_record = record["compensation"]
            repairs = [r for r in compensation_record["repairs"] if "skipped" not in r]
            assert repairs and compensation_record["method"] == "lstsq" and compensation_record["ridge"] == DEFAULT_RIDGE
            assert all(r["error_after"] < r["error_before"] for r in repairs)
    if method != "shortgpt":
        assert errors["lstsq"] < errors["none"], errors


def test_a_search_by_repair_error_removes_the_layer_the_repair_restores_best(tiny_dirs, tmp_path):
    """Depth steps of a search with `--layer-criterion repair_error`: each removes the layer (never one of the
    last two) whose repair leaves the lowest error on the model as the step found it."""
    loaded = load_model(str(tiny_dirs["qwen2"]))
    config = SearchConfig(targets=[0.3], mode="depth", layer_criterion="repair_error", compensation="lstsq", **CALIB)
    model = structural_copy(loaded.model)
    calibration = calibration_batches(loaded, config)
    methods.prune(loaded, config, tmp_path / "run")
    steps = json.loads((tmp_path / "run" / "target-30" / "mop.json").read_text())["iterations"]
    assert len(steps) >= 2
    for step in steps:
        errors = depth_repair_errors(model, loaded.adapter, calibration, DEFAULT_DEPTH_RIDGE)
        assert step["layer"] == int(errors[:-2].argmin())
        cut(model, loaded.adapter, calibration, config.compensation_settings, layer=step["layer"])


def test_compensation_is_part_of_the_run_identity(tiny_dirs, tmp_path):
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    plain = SearchConfig(targets=[0.2])
    assert "compensation" not in plain.identity()  # runs made before the option stay theirs
    repaired = SearchConfig(targets=[0.2], compensation="lstsq", compensation_ridge=0.05)
    assert repaired.identity()["compensation"] == "lstsq" and repaired.identity()["compensation_ridge"] == 0.05
    assert repaired.identity()["compensation_depth_ridge"] == DEFAULT_DEPTH_RIDGE
    one_ridge = SearchConfig(targets=[0.2], compensation="lstsq", compensation_ridge=0.05, compensation_depth_ridge=0.05)
    assert "compensation_depth_ridge" not in one_ridge.identity()  # as runs made before the depth ridge existed
    methods.prune(loaded, SearchConfig(targets=[0.2], mode="width", **CALIB), tmp_path / "run")
    with pytest.raises(Exception, match="compensation"):
        methods.prune(load_model(str(tiny_dirs["llama-gqa"])),
                      SearchConfig(targets=[0.2], mode="width", compensation="lstsq", **CALIB), tmp_path / "run")


def test_llava_language_model_is_repaired_and_its_vision_tower_kept(tmp_path, tokenizer):
    from test_llava import build_llava
    from transformers import LlamaConfig

    text = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       intermediate_size=96, num_hidden_layers=4, vocab_size=len(tokenizer))
    directory = build_llava(tmp_path / "llava", text, tokenizer, processor=False)
    loaded = load_model(str(directory))
    adapter = loaded.adapter
    vision = {k: v.clone() for k, v in loaded.model.model.vision_tower.state_dict().items()}
    calibration = calibration_batches(loaded, SearchConfig(targets=[0.2], **CALIB))
    ids = held_out_text(tokenizer)[0].input_ids
    dense = logits(loaded.model, ids)
    width = no_cut(loaded.model, adapter)
    width["neurons"] = [list(range(0, 96, 3)) for _ in width["neurons"]]
    errors = {}
    for settings in (CompensationSettings(), CompensationSettings("lstsq")):
        copy = structural_copy(loaded.model)
        cut(copy, adapter, calibration, settings, width=width)
        cut(copy, adapter, calibration, settings, layer=2)
        errors[settings.method] = held_out_error(copy, dense, ids)
        assert all(torch.equal(v, vision[k]) for k, v in copy.model.vision_tower.state_dict().items())
    assert errors["lstsq"] < errors["none"], errors


def test_moments_gather_rows_into_the_full_product_exactly_symmetric(monkeypatch):
    monkeypatch.setattr("mop.pruning.compensation.GRAM_ROWS", 16)  # adds of 7 rows: products of 21, 21, 8
    monkeypatch.setattr("mop.pruning.compensation.GRAM_BLOCK", 8)  # 38 columns = 4 blocks of 8 and a tail of 6
    x = torch.randn(50, 37, generator=torch.Generator().manual_seed(0))
    moments = _Moments(37, bias=True)
    for start in range(0, 50, 7):
        moments.add(x[start:start + 7])
    full = torch.cat([x, torch.ones(50, 1)], 1).double()
    assert moments.tokens == 50
    torch.testing.assert_close(moments.mean, full.T @ full / 50, rtol=1e-5, atol=1e-5)
    assert torch.equal(moments.gram, moments.gram.T)
