"""The peer pruning methods (ShortGPT, LLM-Pruner): their scores equal the papers' definitions computed here
independently, they remove exactly the units those scores rank lowest, reach their targets, write checkpoints
that reload with the same logits, and resume like the search."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import SHARED_DATA, tiny_model
from mop import data
from mop.cli import main
from mop.models import count_params, embedding_params, layer_params, load_model, save_checkpoint
from mop.models.adapters import LayerShape, adapter_for
from mop.pruning import methods
from mop.pruning.methods.llm_pruner import LLMPruner, taylor_importance, uniform_plan
from mop.pruning.methods import oneshot
from mop.pruning.methods.shortgpt import ShortGPT
from mop.pruning.search import Search, SearchConfig, calibration_batches, target_name
from mop.pruning.state import RunState
from mop.pruning.surgery import prune_width, remove_layer, structural_copy
from mop.pruning.width import _lowest

CALIB = dict(calib_samples=10, calib_max_length=48, batch_size=3)  # 4 batches, the last one short
SMALL = ["--calib-samples", "10", "--calib-max-length", "48", "--batch-size", "3"]
IDS = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def prune(model_dir: Path, out: Path, method: str, targets: list[float], **settings):
    loaded = load_model(str(model_dir))
    original = structural_copy(loaded.model)  # the pruners never write into the loaded model's tensors
    state = methods.prune(loaded, SearchConfig(targets=targets, method=method, **{**CALIB, **settings}), out)
    return loaded, original, state


def assert_provenance(record: dict, loaded, method: str, target: float, params: int, original: int, embedded: int):
    assert record["method"] == method and record["target"] == target and record["seed"] == 0
    assert record["source"]["sha256"] == loaded.weights_sha256 and record["source"]["name"] == loaded.name
    assert record["params"] == params
    assert record["compression"] == pytest.approx(1 - params / original, abs=1e-12)
    assert record["non_embedding_compression"] == pytest.approx(1 - (params - embedded) / (original - embedded),
                                                                abs=1e-12)
    assert record["settings"] == {"calib": "alpaca", **CALIB}


def test_calibration_prompts_are_the_searchs(tiny_dirs, tmp_path):
    loaded = load_model(str(tiny_dirs["llama-gqa"]))
    config = SearchConfig(targets=[0.2], seed=5, **CALIB)
    ours = calibration_batches(loaded, config)
    search = Search(loaded, config, tmp_path / "search").calibration
    assert len(ours) == len(search) == 4
    for a, b in zip(ours, search):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert all(torch.equal(a.input_ids, b.input_ids)  # independent of the seed
               for a, b in zip(ours, calibration_batches(loaded, replace(config, seed=0))))


# ---------------------------------------------------------------- ShortGPT


@torch.no_grad()
def block_influence_by_hand(model, batches) -> list[float]:
    """1 − mean cos(x_in, x_out) over all real tokens, from output_hidden_states (x_out of the last layer: the
    final norm's input), float64."""
    layers = len(model.model.layers)
    final = {}
    handle = model.model.norm.register_forward_pre_hook(lambda module, args: final.__setitem__("x", args[0]))
    cos_sum, tokens = [0.0] * layers, 0
    for batch in batches:
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       output_hidden_states=True).hidden_states
        outputs = [*hidden[1:layers], final["x"]]
        real = batch.attention_mask.bool()
        for i in range(layers):
            x, y = hidden[i][real].double(), outputs[i][real].double()  # [N, d]
            cos_sum[i] += ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).sum().item()
        tokens += int(real.sum())
    handle.remove()
    return [1 - s / tokens for s in cos_sum]


def test_shortgpt_removes_the_lowest_block_influence_layers(family, tiny_dirs, tmp_path):
    targets = [0.2, 0.45]
    loaded, original, state = prune(tiny_dirs[family], tmp_path, "shortgpt", targets)
    influence = block_influence_by_hand(original, calibration_batches(loaded, SearchConfig(targets, **CALIB)))
    torch.testing.assert_close(torch.tensor(state.header["scores"]["block_influence"]), torch.tensor(influence),
                               rtol=0, atol=1e-6)
    ranking = sorted(range(len(influence)), key=influence.__getitem__)
    p0, embedded = count_params(original), embedding_params(original)
    share = layer_params(original.model.layers[0]) / p0  # every tiny layer has the same size
    for target in targets:
        removed = ranking[: math.ceil(round(target / share, 9))]  # the fewest lowest-BI layers that reach it
        expected = structural_copy(original)
        for index in sorted(removed, reverse=True):
            remove_layer(expected, adapter_for(expected), index)
        directory = tmp_path / target_name(target)
        reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
        assert count_params(reloaded) == count_params(expected)
        kept = [i for i in range(len(influence)) if i not in removed]
        for layer, i in zip(reloaded.model.layers, kept, strict=True):  # the kept layers, in order, untouched
            assert torch.equal(layer.mlp.down_proj.weight, original.model.layers[i].mlp.down_proj.weight)
        torch.testing.assert_close(logits(reloaded), logits(expected), rtol=0, atol=1e-5)
        compression = 1 - count_params(reloaded) / p0
        assert target <= compression < target + share
        record = json.loads((directory / "mop.json").read_text())
        assert_provenance(record, loaded, "shortgpt", target, count_params(expected), p0, embedded)
        assert record["path"] == "D" * len(removed)
        assert [r["original_layer"] for r in record["iterations"]] == removed


# ---------------------------------------------------------------- LLM-Pruner


def importance_by_hand(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ |w · ∂L/∂w| per KV group [layers, kv_heads] and per neuron [layers, intermediate], float64: L from the
    model's own logits over all batches, one backward pass, each group's weights gathered index by index."""
    weights = [p for p in model.parameters()]
    tokens = sum(int(b.attention_mask[:, 1:].sum()) for b in batches)
    loss = 0
    for batch in batches:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        labels = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
        loss = loss + F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1), reduction="sum")
    grads = dict(zip(weights, torch.autograd.grad(loss / tokens, weights)))
    term = {p: (p.detach().double() * grads[p].double()).abs() for p in weights}  # |w · ∂L/∂w|
    shape = adapter_for(model).shape(model)
    d, n_rep = shape.head_dim, shape.n_rep
    groups = torch.zeros(len(model.model.layers), shape.kv_heads, dtype=torch.float64)
    neurons = torch.zeros(len(model.model.layers), shape.intermediate, dtype=torch.float64)
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        for g in range(shape.kv_heads):
            q_rows = [h * d + k for h in range(g * n_rep, (g + 1) * n_rep) for k in range(d)]
            kv_rows = list(range(g * d, (g + 1) * d))
            total = term[a.q_proj.weight][q_rows].sum() + term[a.o_proj.weight][:, q_rows].sum()
            total += term[a.k_proj.weight][kv_rows].sum() + term[a.v_proj.weight][kv_rows].sum()
            if a.q_proj.bias is not None:
                total += term[a.q_proj.bias][q_rows].sum() + term[a.k_proj.bias][kv_rows].sum()
                total += term[a.v_proj.bias][kv_rows].sum()
            groups[i, g] = total
        for j in range(shape.intermediate):
            neurons[i, j] = (term[m.gate_proj.weight][j].sum() + term[m.up_proj.weight][j].sum()
                             + term[m.down_proj.weight][:, j].sum())
    return groups, neurons


def test_llm_pruner_importance_is_first_order_taylor(family, tokenizer):
    model = tiny_model(family)
    texts = data.sample(data.load_calibration("alpaca"), 7, 0)
    batches = data.text_batches(tokenizer, texts, 40, 3)
    flags = [p.requires_grad for p in model.parameters()]
    scores = taylor_importance(model, adapter_for(model), batches)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # the model's own .grad is left alone
    groups, neurons = importance_by_hand(model, batches)
    torch.testing.assert_close(torch.stack([s.groups for s in scores]), groups, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(torch.stack([s.neurons for s in scores]), neurons, rtol=1e-4, atol=1e-9)


def test_llm_pruner_prunes_the_least_important_units_uniformly(family, tiny_dirs, tmp_path):
    targets = [0.25, 0.5]
    loaded, original, state = prune(tiny_dirs[family], tmp_path, "llm-pruner", targets)
    shape, n_layers = adapter_for(original).shape(original), len(original.model.layers)
    p0, embedded = count_params(original), embedding_params(original)
    scores = state.header["scores"]
    for target in targets:
        directory = tmp_path / target_name(target)
        config = json.loads((directory / "config.json").read_text())
        reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
        layers = reloaded.model.layers
        kv_heads = {layer.self_attn.k_proj.out_features // shape.head_dim for layer in layers}
        widths = {layer.mlp.gate_proj.out_features for layer in layers}
        assert len(layers) == n_layers and kv_heads == {config["num_key_value_heads"]} and \
            widths == {config["intermediate_size"]}  # uniform, and as the config says
        removed_groups, removed_neurons = shape.kv_heads - kv_heads.pop(), shape.intermediate - widths.pop()
        assert 0 < removed_neurons and removed_groups < shape.kv_heads
        # the target, to within one neuron per layer
        assert abs(count_params(reloaded) - (1 - target) * p0) <= n_layers * shape.neuron_params
        expected = structural_copy(original)
        prune_width(expected, adapter_for(expected),
                    [_lowest(torch.tensor(g), removed_groups) for g in scores["groups"]],
                    [_lowest(torch.tensor(n), removed_neurons) for n in scores["neurons"]])
        torch.testing.assert_close(logits(reloaded), logits(expected), rtol=0, atol=1e-5)
        record = json.loads((directory / "mop.json").read_text())
        assert_provenance(record, loaded, "llm-pruner", target, count_params(expected), p0, embedded)
        assert record["path"] == "W"


SMOLLM2 = (LayerShape(576, 64, 3, 3, 1536, qkv_bias=False, mlp_bias=False), 30)


@pytest.mark.parametrize("target", [0.05, 0.2, 0.3, 0.4, 0.6])
def test_uniform_plan_splits_by_share_and_reaches_the_budget(target):
    shape, layers = SMOLLM2
    original = 134_515_008
    budget = round(target * original)
    plan = uniform_plan(shape, layers, budget)
    share = shape.attention_params / (shape.attention_params + shape.mlp_params)
    assert plan.groups_per_layer == min(round(budget / layers * share / shape.group_params), 2)
    assert plan.achieved == layers * (plan.groups_per_layer * shape.group_params
                                      + plan.neurons_per_layer * shape.neuron_params)
    assert 0 <= plan.achieved - budget < layers * shape.neuron_params  # at least the budget, to the neuron


def test_uniform_plan_gives_attention_what_the_mlp_cannot_take():
    shape = LayerShape(64, 16, 4, 1, 8, qkv_bias=False, mlp_bias=False)  # a group: 4096, a neuron: 192
    plan = uniform_plan(shape, 2, 2 * (7 * 192 + 2 * 4096))
    assert (plan.groups_per_layer, plan.neurons_per_layer) == (2, 7)
    assert plan.achieved == plan.planned


# ---------------------------------------------------------------- runs: resume, refusal, CLI


@pytest.mark.parametrize("method", ["shortgpt", "llm-pruner"])
def test_rerun_is_a_no_op_and_another_run_is_refused(method, tiny_dirs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["prune", str(tiny_dirs["qwen2"]), "--method", method, "--target", "0.3", "--out", str(out), *SMALL]
    assert main(args) == 0
    before = snapshot(out)
    cls = {"shortgpt": ShortGPT, "llm-pruner": LLMPruner}[method]
    with monkeypatch.context() as patch:  # a finished run neither scores, nor saves, nor rewrites run.json
        patch.setattr(cls, "score", lambda self: pytest.fail("scored again"))
        patch.setattr(oneshot, "save_checkpoint", lambda *args: pytest.fail("saved again"))
        patch.setattr(RunState, "save", lambda self: pytest.fail("run.json rewritten"))
        assert main(args) == 0
    after = snapshot(out)
    after_log = after.pop("mop.log")
    assert after_log.startswith(before.pop("mop.log"))  # the log keeps every invocation
    assert after == before
    capsys.readouterr()
    other = {"shortgpt": "llm-pruner", "llm-pruner": "shortgpt"}[method]
    for changed, differs in ((["--method", other], "method"), (["--seed", "1"], "seed"),
                             (["--method", "mop"], "method")):
        assert main([*args, *changed]) == 2
        error = capsys.readouterr().err
        assert "holds a different run" in error and differs in error
    assert snapshot(out) == {**before, "mop.log": after_log}  # refused: not even the log is touched


@pytest.mark.parametrize("method", ["shortgpt", "llm-pruner"])
def test_interrupted_or_extended_run_gives_the_same_bytes(method, tiny_dirs, tmp_path, monkeypatch):
    """A run killed right after its first checkpoint, and a run to one target extended to two, both finish
    with the bytes of one uninterrupted run; resuming reads the scores from run.json."""
    whole, killed, grown = tmp_path / "whole", tmp_path / "killed", tmp_path / "grown"
    prune(tiny_dirs["mistral"], whole, method, [0.2, 0.4])
    prune(tiny_dirs["mistral"], grown, method, [0.4])

    def save_then_die(*args):
        save_checkpoint(*args)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(oneshot, "save_checkpoint", save_then_die)
        prune(tiny_dirs["mistral"], killed, method, [0.2, 0.4])
    assert (killed / "target-20").is_dir() and not (killed / "target-40").exists()
    cls = {"shortgpt": ShortGPT, "llm-pruner": LLMPruner}[method]
    monkeypatch.setattr(cls, "score", lambda self: pytest.fail("scores recomputed"))
    prune(tiny_dirs["mistral"], killed, method, [0.2, 0.4])
    prune(tiny_dirs["mistral"], grown, method, [0.2, 0.4])
    weights = lambda root: {k: v for k, v in snapshot(root).items() if k.endswith(".safetensors")}
    assert weights(killed) == weights(grown) == weights(whole) and len(weights(whole)) == 2
    reached = lambda root: json.loads((root / "run.json").read_text())["targets"]
    assert reached(killed) == reached(whole)


def test_unreachable_target_is_refused_before_any_work(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dirs["llama-gqa"]), "--method", "shortgpt", "--target", "0.8",
                 "--out", str(out), *SMALL]) == 2
    assert "cannot be reached by shortgpt" in capsys.readouterr().err
    assert not out.exists()


def test_cli_prunes_with_shortgpt(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mop.cli", "prune", str(tiny_dirs["llama-gqa"]), "--method",
                           "shortgpt", "--target", "0.3", "--out", str(out), *SMALL],
                          capture_output=True, text=True, env={**os.environ, "MOP_DATA_DIR": str(SHARED_DATA)})
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "target-30" / "mop.json").read_text())
    assert record["method"] == "shortgpt" and set(record["path"]) == {"D"}
    reloaded = AutoModelForCausalLM.from_pretrained(out / "target-30")
    assert count_params(reloaded) == record["params"] and 0.3 <= record["compression"]
    assert json.loads((out / "run.json").read_text())["targets"]["target-30"]["params"] == record["params"]


@pytest.mark.parametrize("method", ["shortgpt", "llm-pruner"])
def test_body_targets_count_non_embedding_parameters(tiny_dirs, tmp_path, method):
    """With compression_of="body" the target is a share of the non-embedding parameters: reached, and for
    ShortGPT by the first layer count that reaches it."""
    loaded = load_model(str(tiny_dirs["llama-mha"]))
    original, embedded = count_params(loaded.model), embedding_params(loaded.model)
    prune(tiny_dirs["llama-mha"], tmp_path, method, [0.3], compression_of="body")
    record = json.loads((tmp_path / "target-30" / "mop.json").read_text())
    body = 1 - (record["params"] - embedded) / (original - embedded)
    assert record["compression_of"] == "body" and record["non_embedding_compression"] == pytest.approx(body)
    if method == "shortgpt":
        layer = layer_params(loaded.adapter.layers(loaded.model)[0]) / (original - embedded)
        assert 0.3 <= body < 0.3 + layer and record["compression"] < 0.3  # the same run short of 30% of all
    else:
        neuron_row = loaded.adapter.shape(loaded.model).neuron_params * len(loaded.adapter.layers(loaded.model))
        neuron_row /= original - embedded
        assert abs(body - 0.3) < neuron_row
