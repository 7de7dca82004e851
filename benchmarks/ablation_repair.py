"""Ablation of the closed-form repair (issue 27) on SmolLM2-135M, no recovery, WikiText-2 perplexity on the first
8 standard segments. Calibration: 32 WikiText-2 validation prompts of at most 512 tokens (the README job's).

Width cells cut one shot, in every layer, the 540 MLP neurons of lowest AMP score (1536 → 996, the MLP width of
width-only at 20% of all parameters), then repair each layer's down_proj:

- `width-none`: no repair;
- `width-lstsq-rR`: the library's repair (`width_repair`) with ridge R: inputs and targets from the uncut model,
  every layer fitted on the same pass;
- `width-sequential`: layer by layer, inputs from the model whose earlier layers are already cut and repaired,
  targets the uncut layer's output on the uncut model's stream (SparseGPT's / SlimGPT's order);
- `width-residual`: the same inputs, and as target what brings the cut stream's residual back to the uncut
  stream's after the layer (upstream drift corrected too);
- `width-obs`: the neurons chosen by the repair's own error instead of AMP (greedy structured OBS on each
  layer's Gram, one neuron a round: the library's `elimination_order`, which `--width-criterion repair_error`
  runs in 64 rounds), then the library's repair;
- `width-intercept`: the library's repair with a bias on down_proj absorbing the mean of what was cut (FLAP's
  compensation; LLaMA's `mlp_bias` would carry it, with gate and up biases of zero).

Cells ending in `-n128` calibrate on 128 prompts instead (the default of `mop prune`); cells ending in `-pN`
on N packed windows of exactly 512 tokens of the joined validation text (`--calib-packed`: GPTQ's and
SparseGPT's calibration; 32 prompts hold about 4,700 tokens, 8 windows 4,096 and 32 windows 16,384).

Depth cells (`depth-rR`) remove ShortGPT's 8 lowest-block-influence layers (20% of the parameters), repaired by
the library's `depth_repair` with ridge R (see ablation_depth_repair.py for the map placement); `depth-none` removes
them with no repair.

One JSON per cell in docs/study/repair-ablation/; a rerun computes only missing ones.

    MOP_DATA_DIR=../shared/data python benchmarks/ablation_repair.py [--only CELL ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from mop import data
from mop.evaluation.perplexity import segments_perplexity
from mop.models import load_model
from mop.pruning.compensation import (CompensationSettings, _calibration_pass, _Moments, depth_repair,
                                      elimination_order, recorded_width_moments, refit_columns, width_repair)
from mop.pruning.criteria import amp
from mop.pruning.methods.shortgpt import block_influences, consecutive_runs, removal_order
from mop.pruning.search import SearchConfig, calibration_batches
from mop.pruning.surgery import remove_layer, structural_copy

DOCS = Path(__file__).resolve().parents[1] / "docs" / "study" / "repair-ablation"
KEEP_NEURONS = 996
DEPTH_LAYERS = 8
RIDGES = (1e-3, 1e-2, 1e-1, 3e-1, 1.0)
CELLS = (["width-none"] + [f"width-lstsq-r{r:g}" for r in RIDGES]
         + ["width-sequential", "width-residual", "width-obs", "width-intercept"]
         + [f"depth-r{r:g}" for r in (1e-5, 1e-4, *RIDGES)] + [f"width-lstsq-r{r:g}-n128" for r in (1e-2, 1e-1)]
         + ["width-lstsq-r0.1-p128", "depth-r0.0001-p128", "width-obs-p128", "width-lstsq-r0.1-p32",
            "width-none-p128", "width-lstsq-r0.01-p128", "depth-r0.0001-p32", "depth-none-p128",
            "width-lstsq-r0.1-p8", "depth-r0.0001-p8"])
CALIBRATIONS = {"": (32, False), "-n128": (128, False), "-p8": (8, True), "-p32": (32, True), "-p128": (128, True)}  # suffix → (samples, packed)
RIDGE = 1e-2  # of the cells that do not sweep it


def layer_inputs(model: nn.Module, layers, batches) -> tuple[list[torch.Tensor], list[dict]]:
    """Per batch, the first decoder layer's input [B, T, d] and its keyword arguments (mask, rotary tables)."""
    class Caught(Exception):
        pass

    caught = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        caught.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            try:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            except Caught:
                pass
    handle.remove()
    return [x for x, _ in caught], [kwargs for _, kwargs in caught]


def run_layer(layer: nn.Module, streams: list[torch.Tensor], kwargs: list[dict]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The layer's outputs on each batch's stream, and its down_proj inputs [B, T, inter]."""
    inputs, outputs = [], []
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        for x, kw in zip(streams, kwargs):
            out = layer(x, **kw)
            outputs.append(out[0] if isinstance(out, tuple) else out)
    handle.remove()
    return outputs, inputs


@torch.no_grad()
def sequential_repair(model, layers, batches, cuts: list[list[int]], residual: bool) -> None:
    """`width-sequential` and `width-residual`: each layer's down_proj re-fitted, in order, on the cut stream."""
    uncut, kwargs = layer_inputs(model, layers, batches)
    stream = [x.clone() for x in uncut]
    real = [batch.attention_mask.bool() for batch in batches]
    for layer, cut in zip(layers, cuts):
        down = layer.mlp.down_proj
        keep = torch.ones(down.in_features, dtype=torch.bool)
        keep[cut] = False
        uncut_out, uncut_h = run_layer(layer, uncut, kwargs)
        stream_out, stream_h = run_layer(layer, stream, kwargs)
        gram = torch.zeros(int(keep.sum()), int(keep.sum()), dtype=torch.float64)
        cross = torch.zeros(down.out_features, int(keep.sum()), dtype=torch.float64)
        tokens = 0
        for b, mask in enumerate(real):
            h = stream_h[b][mask]  # [N, inter]
            if residual:  # the MLP output that brings the cut stream's residual to the uncut one's
                target = uncut_out[b][mask] - (stream_out[b][mask] - down(h))
            else:
                target = down(uncut_h[b][mask])
            gram += (h[:, keep].T @ h[:, keep]).double()
            cross += (target.T @ h[:, keep]).double()
            tokens += len(h)
        gram, cross = gram / tokens, cross / tokens
        weight = down.weight.detach().double()
        lam = RIDGE * gram.diagonal().mean()
        fitted = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), (cross + lam * weight[:, keep]).T).T
        repaired = torch.zeros_like(weight)
        repaired[:, keep] = fitted
        down.weight = nn.Parameter(repaired.float(), requires_grad=False)
        stream, _ = run_layer(layer, stream, kwargs)
        uncut = uncut_out


def width_cell(loaded, batches, cell: str) -> nn.Module:
    model = structural_copy(loaded.model)
    adapter, layers = loaded.adapter, loaded.adapter.layers(model)
    with recorded_width_moments(model, adapter) as moments:
        scores = amp(model, adapter, batches)
    cut_count = layers[0].mlp.down_proj.in_features - KEEP_NEURONS
    if cell == "width-obs":
        orders = [elimination_order(layer.mlp.down_proj.weight.detach().double(), moments[f"{i}.mlp.down_proj"].mean,
                                    torch.arange(layer.mlp.down_proj.in_features)[:, None], RIDGE)
                  for i, layer in enumerate(layers)]
        cuts = [sorted(torch.argsort(order)[:cut_count].tolist()) for order in orders]
    else:
        cuts = [torch.argsort(s.neurons, stable=True)[:cut_count].tolist() for s in scores]
    if cell in ("width-sequential", "width-residual"):
        sequential_repair(model, layers, batches, cuts, residual=cell == "width-residual")
    elif cell == "width-intercept":
        sums = {i: _Moments(layer.mlp.down_proj.in_features, True) for i, layer in enumerate(layers)}
        _calibration_pass(model, batches, [(layer.mlp.down_proj, "pre", sums[i].add) for i, layer in enumerate(layers)])
        for i, layer in enumerate(layers):
            down = layer.mlp.down_proj
            weight = torch.cat([down.weight.detach().double(), torch.zeros(down.out_features, 1, dtype=torch.float64)], 1)
            keep = torch.ones(down.in_features + 1, dtype=torch.bool)
            keep[cuts[i]] = False
            repaired, _, _ = refit_columns(weight, sums[i].mean, keep, RIDGE)
            down.weight = nn.Parameter(repaired[:, :-1].float(), requires_grad=False)
            down.bias = nn.Parameter(repaired[:, -1].float(), requires_grad=False)
    elif cell != "width-none":
        ridge = float(cell.split("-r")[-1]) if "-r" in cell else RIDGE
        width_moments = {path: m for path, m in moments.items() if path.endswith("down_proj")}
        width_repair(model, adapter, batches, [[] for _ in layers], cuts, CompensationSettings("lstsq", ridge),
                     width_moments).apply(model, adapter)
    for layer, cut in zip(layers, cuts):
        layer.mlp.down_proj.weight.data[:, cut] = 0  # the cut, as zero columns: the same function, fewer shapes
    return model


def depth_cell(loaded, batches, cell: str) -> nn.Module:
    settings = None if cell == "depth-none" else CompensationSettings("lstsq", depth_ridge=float(cell.split("-r")[-1]))
    removed = sorted(removal_order(block_influences(loaded.model, loaded.adapter, batches).tolist())[:DEPTH_LAYERS])
    model, gone = structural_copy(loaded.model), 0
    for first, count in consecutive_runs(removed):
        index = first - gone
        if index > 0 and settings is not None:
            depth_repair(model, loaded.adapter, batches, index, settings, count).apply(model, loaded.adapter)
        for _ in range(count):
            remove_layer(model, loaded.adapter, index)
        gone += count
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", choices=CELLS)
    args = parser.parse_args()
    DOCS.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m")
    segments = data.text_segments(loaded.tokenizer, data.perplexity_text("wikitext2"), 2048, 8)
    for cell in args.only or CELLS:
        path = DOCS / f"{cell}.json"
        if path.exists():
            continue
        suffix = next(s for s in sorted(CALIBRATIONS, key=len, reverse=True) if cell.endswith(s))
        samples, packed = CALIBRATIONS[suffix]
        batches = calibration_batches(loaded, SearchConfig(targets=[0.2], calib="wikitext2-valid",
                                                           calib_samples=samples, calib_packed=packed))
        started = time.perf_counter()
        base = cell.removesuffix(suffix) if suffix else cell
        model = (width_cell if cell.startswith("width") else depth_cell)(loaded, batches, base)
        result = {"cell": cell, "calib": "wikitext2-valid", "calib_samples": samples, "device": "cpu",
                  "seconds": round(time.perf_counter() - started, 1), "ppl8": segments_perplexity(model, segments),
                  **({"calib_packed": True} if packed else {})}
        path.write_text(json.dumps(result, indent=1))
        print(cell, f"{result['ppl8']:.2f}", flush=True)


if __name__ == "__main__":
    main()
