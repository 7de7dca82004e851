"""Closed-form repair of a structural cut from calibration activations: no gradient step, no new module.

Width. A layer's o_proj reads the concatenated query-head outputs z [n = H·d_h] and its down_proj the MLP
activations h [n = intermediate]. Cutting units R keeps the input columns K. The kept columns are re-fitted
by least squares so that the module reproduces its pre-cut output on the calibration tokens, with a ridge
pulling them toward their own values:

    W'_K = argmin E‖W x − W'_K x_K‖² + λ‖W'_K − W_K‖²  =  W_K + W_R C_RK (C_KK + λI)⁻¹

where C = E[x xᵀ] is the input's second moment (float64) and λ = ridge · mean(diag C_KK). A module with a
bias gets a constant input appended to x, so its bias absorbs the mean of what was cut (FLAP's compensation).

Depth. Removing layer ℓ drops its update Δ = x_out − x_in from the residual stream. The last writer into the
residual stream before it, layer ℓ−1's down_proj, has its output m [d] mapped by I + B so that m + B m stands in
for Δ as well (ReplaceMe, LinearPatch); nothing else in layer ℓ−1 reads m, so the map folds exactly into
down_proj: W_down' = (I + B) W_down. B = E[Δ mᵀ] (E[m mᵀ] + λI)⁻¹, the ridge pulling toward no map.
Layer 0 has no layer before it and is removed without repair (its record says so): the embeddings could
carry the map only by untying them from lm_head, which would change the checkpoint's shapes.

Both read the model being cut (its activations are the inputs and its outputs the targets), in one forward
pass over the calibration batches that stops after the last layer it needs. Grams are accumulated one chunk
of layers at a time within `GRAM_BYTES`, so a 7B layer's MLP Gram (1 GB) is held alone. A repair is
computed first (`Repair`) and applied to any structural copy of the model it was computed on, before the cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mop.data import Batch
from mop.models import DecoderAdapter, input_device
from mop.pruning.surgery import prune_width, remove_layer

METHODS = ("none", "lstsq")
GRAM_BYTES = 1 << 30  # bound on the float64 Grams held during one calibration pass
DEFAULT_RIDGE = 1e-2


@dataclass(frozen=True)
class CompensationSettings:
    method: str = "none"  # one of METHODS
    ridge: float = DEFAULT_RIDGE  # λ as a share of the mean diagonal of the kept inputs' Gram

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass
class Repair:
    """New weights (and biases) for some linear modules of a model, by their path from the model's decoder
    layer list (`"3.mlp.down_proj"`), and the reconstruction record of each layer repaired."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def apply(self, model: nn.Module, adapter: DecoderAdapter) -> None:
        """Give `model`'s modules the repaired tensors as new parameters (nothing shared is written into)."""
        layers = adapter.layers(model)
        for path, (weight, bias) in self.weights.items():
            linear = layers.get_submodule(path)
            grad = linear.weight.requires_grad
            linear.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=grad)
            if bias is not None:
                linear.bias = nn.Parameter(bias.to(linear.bias.dtype), requires_grad=grad)


class _Stop(Exception):
    """Raised by a hook once the last layer a pass needs has run."""


class _Moments:
    """Running sums over real tokens of x xᵀ (with a constant input appended when `bias`), float64, on the
    device of the activations."""

    def __init__(self, size: int, bias: bool):
        self.size, self.bias = size, bias
        self.gram: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:  # x [N, size]
        if self.bias:
            x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        x = x.float()
        if self.gram is None:
            self.gram = torch.zeros(self.size + self.bias, self.size + self.bias, dtype=torch.float64, device=x.device)
        self.gram += x.T @ x  # one batch's product in float32 (half the time of float64 on a CPU), summed in float64
        self.tokens += len(x)

    @property
    def mean(self) -> torch.Tensor:
        return self.gram / max(self.tokens, 1)


def _calibration_pass(model: nn.Module, batches: list[Batch], hooks: list[tuple[nn.Module, str, Callable]]) -> None:
    """Run the calibration batches with `hooks` registered: (module, "pre", fn(x)) reads a module's input,
    (module, "post", fn(x, output)) its input and output, both [N, ...] at real tokens. Each forward stops
    once the last hooked module has run."""
    real: dict[str, torch.Tensor] = {}

    def pre(fn: Callable):
        def read(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            fn(x[real["mask"].to(x.device)])

        return read

    def post(fn: Callable):
        def read(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            mask = real["mask"].to(x.device)
            fn(x[mask], out[mask])

        return read

    def stop(*_):
        raise _Stop

    handles = [module.register_forward_pre_hook(pre(fn), with_kwargs=True) if kind == "pre"
               else module.register_forward_hook(post(fn), with_kwargs=True) for module, kind, fn in hooks]
    handles.append(hooks[-1][0].register_forward_hook(stop))  # after the last module's own hooks
    device = input_device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                real["mask"] = batch.attention_mask.bool()
                try:
                    model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                          logits_to_keep=1, use_cache=False)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def _full_weight(linear: nn.Linear, device: torch.device) -> torch.Tensor:
    """[out, in (+1)] float64 on `device`: the weight, with the bias as a last column when there is one."""
    weight = linear.weight.detach().to(device, torch.float64)
    if linear.bias is None:
        return weight
    return torch.cat([weight, linear.bias.detach().to(device, torch.float64)[:, None]], 1)


def _relative_error(delta: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """E‖Δ x‖² / E‖W x‖² from the Gram: tr(Δ C Δᵀ) / tr(W C Wᵀ)."""
    return float(((delta @ gram) * delta).sum() / ((weight @ gram) * weight).sum().clamp_min(1e-300))


def _solve_spd(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """system⁻¹ rhs for a symmetric positive definite `system` (a ridged Gram): Cholesky, a third of an LU's
    work; a general solve where rounding leaves it indefinite."""
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        return torch.linalg.solve(system, rhs)
    return torch.cholesky_solve(rhs, factor)


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float
                  ) -> tuple[torch.Tensor, float, float]:
    """The least-squares repair of a cut: `weight` [out, n] (float64) reading inputs of second moment `gram`
    [n, n] keeps input columns `keep` (bool [n]). Returns the new weight (cut columns zeroed), and the relative
    output error before (cut columns zeroed, nothing re-fitted) and after."""
    cut = ~keep
    c_kk, c_kr = gram[keep][:, keep], gram[keep][:, cut]
    lam = ridge * c_kk.diagonal().mean().clamp_min(1e-12)
    system = c_kk + lam * torch.eye(len(c_kk), dtype=gram.dtype, device=gram.device)
    correction = _solve_spd(system, c_kr @ weight[:, cut].T).T  # W_R C_RK (C_KK + λI)⁻¹, [out, |K|]
    repaired = torch.zeros_like(weight)
    repaired[:, keep] = weight[:, keep] + correction
    plain = weight * keep
    return repaired, _relative_error(weight - plain, weight, gram), _relative_error(weight - repaired, weight, gram)


def _layer_chunks(sizes: list[int]) -> list[list[int]]:
    """Consecutive layer indices grouped so that each group's Grams (`sizes`, bytes) fit GRAM_BYTES (one
    layer at least)."""
    chunks: list[list[int]] = [[]]
    used = 0
    for index, size in enumerate(sizes):
        if chunks[-1] and used + size > GRAM_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(index)
        used += size
    return chunks


def width_repair(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], groups: list[list[int]],
                 neurons: list[list[int]], settings: CompensationSettings) -> Repair:
    """The repair of cutting, in every layer i, KV groups `groups[i]` (their n_rep query heads' o_proj input
    columns) and MLP neurons `neurons[i]` (down_proj input columns) from `model`."""
    shape = adapter.shape(model)
    layers = adapter.layers(model)
    repair = Repair()
    cut_layers = [i for i in range(len(layers)) if groups[i] or neurons[i]]

    def modules(i: int) -> list[tuple[str, nn.Linear, torch.Tensor]]:
        """(path, linear, keep mask over its inputs) of layer i's modules that lose inputs."""
        found = []
        if groups[i]:
            keep = torch.ones(shape.kv_heads, dtype=torch.bool)
            keep[groups[i]] = False
            found.append(("self_attn.o_proj", layers[i].self_attn.o_proj,
                          keep.repeat_interleave(shape.n_rep * shape.head_dim)))
        if neurons[i]:
            keep = torch.ones(shape.intermediate, dtype=torch.bool)
            keep[neurons[i]] = False
            found.append(("mlp.down_proj", layers[i].mlp.down_proj, keep))
        return found

    sizes = [sum(8 * (m.in_features + 1) ** 2 for _, m, _ in modules(i)) for i in cut_layers]
    for chunk in _layer_chunks(sizes):
        targets = [(cut_layers[c], path, linear, keep) for c in chunk for path, linear, keep in modules(cut_layers[c])]
        moments = [_Moments(linear.in_features, linear.bias is not None) for _, _, linear, _ in targets]
        _calibration_pass(model, batches, [(linear, "pre", m.add)
                                           for (_, _, linear, _), m in zip(targets, moments)])
        for (i, path, linear, keep), m in zip(targets, moments):
            keep = torch.cat([keep, keep.new_ones(1)]) if m.bias else keep  # the constant input stays
            gram = m.mean
            keep = keep.to(gram.device)
            weight, before, after = refit_columns(_full_weight(linear, gram.device), gram, keep, settings.ridge)
            bias = weight[:, -1] if m.bias else None
            repair.weights[f"{i}.{path}"] = (weight[:, :-1] if m.bias else weight, bias)
            repair.records.append({"layer": i, "module": path, "error_before": before, "error_after": after,
                                   "tokens": m.tokens})
    return repair


def depth_repair(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], index: int,
                 settings: CompensationSettings, count: int = 1) -> Repair:
    """The repair of removing decoder layers index … index+count−1 (a run) from `model`: layer index−1's
    down_proj output m mapped by I + B so that it also carries the run's update Δ (see the module doc)."""
    removed = list(range(index, index + count))
    if index == 0:
        return Repair(records=[{"layers": removed, "module": None, "skipped": "no layer before it to fold a map into"}])
    layers = adapter.layers(model)
    down = layers[index - 1].mlp.down_proj
    bias = down.bias is not None
    m_moments = _Moments(down.out_features, bias)
    cross: list[torch.Tensor] = []  # Σ Δ [m; 1]ᵀ, [d, d (+1)]
    energy = {"delta": 0.0, "out": 0.0}
    features: list[torch.Tensor] = []

    def read_m(x: torch.Tensor, out: torch.Tensor) -> None:
        features[:] = [torch.cat([out, out.new_ones(len(out), 1)], 1) if bias else out]
        m_moments.add(out)

    def read_delta(x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        delta = (x_out - x_in).float()
        product = (delta.T @ features[0].float()).double()
        cross[:] = [cross[0] + product] if cross else [product]
        energy["delta"] += float(delta.double().square().sum())
        energy["out"] += float(x_out.double().square().sum())

    run_input: list[torch.Tensor] = []  # the run's first layer's input, [N, d]
    hooks = [(down, "post", read_m), (layers[index], "pre", lambda x: run_input.__setitem__(slice(None), [x])),
             (layers[index + count - 1], "post", lambda x_in, x_out: read_delta(run_input[0], x_out))]
    _calibration_pass(model, batches, hooks)
    n = max(m_moments.tokens, 1)
    c_mm, c_dm = m_moments.gram / n, cross[0] / n
    lam = settings.ridge * c_mm.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(c_mm), dtype=c_mm.dtype, device=c_mm.device)
    b = _solve_spd(c_mm + lam * eye, c_dm.T).T  # [d, d (+1)]
    # E‖Δ − B m‖² = E‖Δ‖² − 2 tr(B C_mΔ) + tr(B C_mm Bᵀ)
    residual = energy["delta"] / n - 2 * float((b * c_dm).sum()) + float(((b @ c_mm) * b).sum())
    full = _full_weight(down, c_mm.device)  # [d, inter (+1)]
    mapped = full + b[:, : down.out_features] @ full
    if bias:
        mapped[:, -1] += b[:, -1]  # the constant feature's coefficients add to the bias
    repair = Repair()
    repair.weights[f"{index - 1}.mlp.down_proj"] = (mapped[:, :-1] if bias else mapped, mapped[:, -1] if bias else None)
    out = max(energy["out"] / n, 1e-300)
    repair.records.append({"layers": removed, "module": f"{index - 1}.mlp.down_proj",
                           "error_before": energy["delta"] / n / out, "error_after": max(residual, 0.0) / out,
                           "tokens": m_moments.tokens})
    return repair


def repair_for(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], settings: CompensationSettings,
               width: dict | None = None, layer: int | None = None, count: int = 1) -> Repair | None:
    """The repair of cutting `width` units ({"groups", "neurons"} per layer) or the `count` decoder layers
    from `layer` on from `model`; None when `settings` asks for none."""
    if not settings.enabled:
        return None
    if width is not None:
        return width_repair(model, adapter, batches, width["groups"], width["neurons"], settings)
    return depth_repair(model, adapter, batches, layer, settings, count)


def cut(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], settings: CompensationSettings,
        width: dict | None = None, layer: int | None = None, count: int = 1, repair: Repair | None = None
        ) -> list[dict] | None:
    """Cut `width` units, or the `count` decoder layers from `layer` on, from `model` in place, repaired first
    when `settings` ask for it (`repair`: one already computed on `model`, else computed here). Returns the
    repair's records."""
    repair = repair or repair_for(model, adapter, batches, settings, width, layer, count)
    if repair is not None:
        repair.apply(model, adapter)
    if width is not None:
        prune_width(model, adapter, width["groups"], width["neurons"])
    else:
        for _ in range(count):
            remove_layer(model, adapter, layer)
    return None if repair is None else repair.records


def compensation_record(settings: CompensationSettings, repairs: list[dict]) -> dict:
    """mop.json's `compensation` entry: the settings and every repair on the way to the checkpoint, with the
    mean relative reconstruction errors before and after (on the calibration tokens); empty when off."""
    if not settings.enabled:
        return {}
    fitted = [r for r in repairs if "skipped" not in r]
    mean = lambda key: sum(r[key] for r in fitted) / len(fitted) if fitted else None
    return {"compensation": {"method": settings.method, "ridge": settings.ridge, "repairs": repairs,
                             "mean_error_before": mean("error_before"), "mean_error_after": mean("error_after")}}
