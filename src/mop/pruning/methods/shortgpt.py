"""ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"):
remove, in one shot, the decoder layers with the lowest Block Influence

    BI_i = 1 − E_t[ cos(x_t^(i), x_t^(i+1)) ]

the expected cosine between layer i's input and output hidden states over the calibration tokens. BI is
computed once, on the original model; a target removes the lowest-BI layers until it is reached, so the
checkpoints of several targets remove nested prefixes of the same ranking.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from mop.data import Batch
from mop.latency.model import ModelShape
from mop.models import DecoderAdapter, count_params, input_device, layer_params
from mop.pruning.methods.oneshot import OneShotPruner
from mop.pruning.state import RunState
from mop.pruning.targets import Target


@torch.no_grad()
def block_influences(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch]) -> torch.Tensor:
    """BI of every decoder layer, [n_layers] float64: 1 − the mean, over every real token of every batch,
    of the cosine between the layer's input and output hidden states (forward hooks, one pass per batch)."""
    layers = adapter.layers(model)
    cosine_sums = torch.zeros(len(layers), dtype=torch.float64)
    real: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def record(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]  # [B, T, d]
            x_out = output[0] if isinstance(output, tuple) else output
            mask = real["mask"].to(x_in.device)
            cos = F.cosine_similarity(x_in[mask].float(), x_out[mask].float(), dim=-1)  # [N]
            cosine_sums[index] += cos.double().sum().cpu()

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = 0
    device = input_device(model)
    try:
        for batch in tqdm(batches, desc="ShortGPT block influence", unit="batch"):
            real["mask"] = batch.attention_mask.bool()
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                  logits_to_keep=1, use_cache=False)
            tokens += int(real["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return 1 - cosine_sums / tokens


def removal_order(influences: list[float]) -> list[int]:
    """Layer indices from the lowest BI to the highest (ties: the lower index first)."""
    return sorted(range(len(influences)), key=lambda i: (influences[i], i))


class ShortGPT(OneShotPruner):
    def settings(self) -> dict:
        c = self.config
        return {"calib": c.calib, "calib_samples": c.calib_samples, "calib_max_length": c.calib_max_length,
                "batch_size": c.batch_size}

    def most_compression(self) -> float:
        """Every layer but one removed (the smallest kept)."""
        sizes = [layer_params(layer) for layer in self.loaded.adapter.layers(self.loaded.model)]
        return (sum(sizes) - min(sizes)) / self.original_params

    def smallest_shape(self) -> ModelShape:
        return replace(self.goals.dense, layers=1)

    def score(self) -> dict:
        return {"block_influence": block_influences(self.loaded.model, self.loaded.adapter, self.calibration).tolist()}

    def cut(self, model: nn.Module, scores: dict, target: Target, state: RunState) -> list[dict]:
        """Remove the lowest-BI layers until the model reaches `target` (keeps at most (1 − target) · P0, or is
        predicted as fast as asked): the removed set is chosen one layer at a time (one record each), then cut in
        runs of consecutive layers, first to last, so that a compensated cut repairs each run as a whole in the
        layer before it."""
        influences = scores["block_influence"]
        sizes = [layer_params(layer) for layer in self.loaded.adapter.layers(model)]
        params = count_params(model)
        removed: list[int] = []  # original indices, in removal order
        left = lambda: replace(self.goals.dense, layers=len(sizes) - len(removed))  # the shape of what is kept
        for step, original in enumerate(removal_order(influences), start=1):
            if self.goals.reached(target, params, left()):
                break
            params -= sizes[original]
            if step > len(state.iterations):
                state.iterations.append({
                    "iteration": step, "choice": "D", "decided_by": "shortgpt",
                    "layer": original - sum(r < original for r in removed),  # among the layers still there
                    "original_layer": original, "block_influence": influences[original], "params": params,
                    "compression": 1 - params / self.original_params,
                    **self.goals.record(replace(left(), layers=len(sizes) - len(removed) - 1)),
                })
            removed.append(original)
        gone = 0  # layers already cut before the current run
        for first, count in consecutive_runs(sorted(removed)):
            self.cut_units(model, layer=first - gone, count=count)
            gone += count
        return state.iterations[: len(removed)]


def consecutive_runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as (first, length) runs of consecutive ones: [2, 3, 4, 7] → [(2, 3), (7, 1)]."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs
