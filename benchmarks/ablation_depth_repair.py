"""Ablation of the depth repair (issue 27) on SmolLM2-135M: ShortGPT's 8 lowest-block-influence layers removed
(20% of the parameters), WikiText-2 perplexity on the first 8 standard segments, no recovery, for

- `none`: the layers removed with no repair;
- `map`:  ReplaceMe's / LinearPatch's placement, a map I + B on the previous layer's MLP output m = W h,
          B = E[Δ mᵀ](E[m mᵀ] + λI)⁻¹, folded as W' = (I + B) W;
- `refit`: the library's repair (`mop.pruning.compensation.depth_repair`), W' = W + E[Δ hᵀ](E[h hᵀ] + λI)⁻¹.

Calibration: 32 WikiText-2 validation prompts of at most 512 tokens (`--calib wikitext2-valid --calib-samples
32`), ridge 1e-2. One JSON per variant in docs/study/depth-repair/; a rerun computes only missing ones.

    MOP_DATA_DIR=../shared/data python benchmarks/ablation_depth_repair.py [--device cuda]
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
from mop.pruning.compensation import CompensationSettings, _calibration_pass, _Moments, _solve_spd, depth_repair
from mop.pruning.methods.shortgpt import block_influences, consecutive_runs, removal_order
from mop.pruning.search import SearchConfig, calibration_batches
from mop.pruning.surgery import remove_layer, structural_copy

DOCS = Path(__file__).resolve().parents[1] / "docs" / "study" / "depth-repair"
LAYERS = 8
SETTINGS = CompensationSettings("lstsq", ridge=1e-2, depth_ridge=1e-2)  # as measured (the defaults then)


def map_on_mlp_output(model: nn.Module, adapter, batches, index: int, count: int) -> None:
    """The ReplaceMe placement, for comparison: regress the run's update on m = W_down h, fold I + B into W_down."""
    layers = adapter.layers(model)
    down = layers[index - 1].mlp.down_proj  # SmolLM2: no bias
    moments, cross, features, run_input = _Moments(down.out_features, False), [], [], []

    def read_m(x, out):
        features[:] = [out]
        moments.add(out)

    def read_delta(x_in, x_out):
        product = ((x_out - run_input[0]).float().T @ features[0].float()).double()
        cross[:] = [cross[0] + product] if cross else [product]

    _calibration_pass(model, batches, [(down, "post", read_m),
                                       (layers[index], "pre", lambda x: run_input.__setitem__(slice(None), [x])),
                                       (layers[index + count - 1], "post", read_delta)])
    c_mm, c_dm = moments.mean, cross[0] / moments.tokens
    lam = SETTINGS.ridge * c_mm.diagonal().mean()
    b = _solve_spd(c_mm + lam * torch.eye(len(c_mm), dtype=c_mm.dtype, device=c_mm.device), c_dm.T).T
    weight = down.weight.detach().double()
    down.weight = nn.Parameter((weight + b @ weight).to(down.weight.dtype), requires_grad=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    DOCS.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m", device=args.device)
    adapter = loaded.adapter
    batches = calibration_batches(loaded, SearchConfig(targets=[0.2], calib="wikitext2-valid", calib_samples=32))
    segments = data.text_segments(loaded.tokenizer, data.perplexity_text("wikitext2"), 2048, 8)
    removed = sorted(removal_order(block_influences(loaded.model, adapter, batches).tolist())[:LAYERS])
    for variant in ("none", "map", "refit"):
        path = DOCS / f"{variant}.json"
        if path.exists():
            continue
        started = time.perf_counter()
        model, gone = structural_copy(loaded.model), 0
        for first, count in consecutive_runs(removed):
            index = first - gone
            if index > 0 and variant == "map":
                map_on_mlp_output(model, adapter, batches, index, count)
            elif index > 0 and variant == "refit":
                depth_repair(model, adapter, batches, index, SETTINGS, count).apply(model, adapter)
            for _ in range(count):
                remove_layer(model, adapter, index)
            gone += count
        result = {"variant": variant, "removed_layers": removed, "calib": "wikitext2-valid", "calib_samples": 32,
                  "ridge": SETTINGS.ridge, "device": args.device, "seconds": round(time.perf_counter() - started, 1),
                  "ppl8": segments_perplexity(model, segments)}
        path.write_text(json.dumps(result, indent=1))
        print(variant, f"{result['ppl8']:.2f}", flush=True)


if __name__ == "__main__":
    main()
