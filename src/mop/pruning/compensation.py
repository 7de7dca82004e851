"""Closed-form repair of a structural cut from calibration activations: no gradient step, no new module.

Width. A layer's o_proj reads the concatenated query-head outputs z [n = H·d_h] and its down_proj the MLP
activations h [n = intermediate]. Cutting units R keeps the input columns K. The kept columns are re-fitted
by least squares so that the module reproduces its pre-cut output on the calibration tokens, with a ridge
pulling them toward their own values:

    W'_K = argmin E‖W x − W'_K x_K‖² + λ‖W'_K − W_K‖²  =  W_K + W_R C_RK (C_KK + λI)⁻¹

where C = E[x xᵀ] is the input's second moment (float64) and λ = ridge · mean(diag C_KK). A module with a
bias gets a constant input appended to x, so its bias absorbs the mean of what was cut (FLAP's compensation).

Depth. Removing layer ℓ (or a run of layers) drops its update Δ = x_out − x_in from the residual stream. The
last writer into the residual stream before it, layer ℓ−1's down_proj (output W h, h [inter] the MLP
activations), is re-fitted so that its output carries Δ as well:

    W' = argmin E‖W h + Δ − W' h‖² + λ‖W' − W‖²  =  W + E[Δ hᵀ] (E[h hᵀ] + λI)⁻¹

A linear map I + B on the MLP output (ReplaceMe, LinearPatch) is the special case W' = (I + B) W; the re-fit
is the least-squares fit over every linear map of h, so it fits the calibration at least as well (measured on
ShortGPT's 8-layer cut of SmolLM2, WikiText-2 on 8 segments: 108.8 plain, 71.3 with the map, 67.9 re-fitted;
docs/design.md). Layer 0 has no layer before it and is removed without repair (its record says so): the
embeddings could carry a correction only by untying them from lm_head, which would change the checkpoint's
shapes.

Both read the model being cut (its activations are the inputs and its outputs the targets). A width cut's
Grams are recorded during the width criterion's own pass over the calibration batches when every layer's fit
in `GRAM_BYTES` together (`recorded_width_moments`; SmolLM2: 0.91 GB); otherwise, and for a depth cut, a
forward pass of their own stops after the last layer it needs, one chunk of modules within `GRAM_BYTES` at a
time, so a 7B layer's MLP Gram (1 GB) is held alone. A repair is computed first (`Repair`) and applied to any
structural copy of the model it was computed on, before the cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mop.data import Batch
from mop.models import DecoderAdapter, input_device
from mop.pruning.surgery import prune_width, remove_layer

METHODS = ("none", "lstsq")
GRAM_BYTES = 1 << 30  # bound on what the Grams of one calibration pass hold (`_gram_bytes`)
DEFAULT_RIDGE = 1e-1  # width re-fits (docs/design.md "Ridge": measured best of 1e-3 to 1)
DEFAULT_DEPTH_RIDGE = 1e-4  # depth re-fits (measured best of 1e-5 to 1)
GRAM_BLOCK = 256  # columns per product in `add_upper_gram`
GRAM_ROWS = 1024  # calibration tokens gathered before one Gram product (docs/design.md "Cost")


@dataclass(frozen=True)
class CompensationSettings:
    method: str = "none"  # one of METHODS
    ridge: float = DEFAULT_RIDGE  # λ of a width re-fit, a share of the mean diagonal of the kept inputs' Gram
    depth_ridge: float = DEFAULT_DEPTH_RIDGE  # λ of a depth re-fit, a share of the mean diagonal of E[h hᵀ]

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


NO_REPAIR = Repair()  # `cut(..., repair=NO_REPAIR)`: the bare cut, whatever the settings


class _Stop(Exception):
    """Raised by a hook once the last layer a pass needs has run."""


def add_upper_gram(total: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """Add xᵀx for `x` [N, n] (float32) to the blocks of `total` [n, n] (float64) on and above the diagonal,
    `block` columns at a time: about half the multiply-adds of the full product. `mirrored` completes it."""
    n = x.shape[1]
    for start in range(0, n, block):
        total[start:start + block, start:] += x[:, start:start + block].T @ x[:, start:]


def mirrored(upper: torch.Tensor) -> torch.Tensor:
    """The exactly symmetric matrix whose upper triangle is `upper`'s [n, n]."""
    return upper.triu() + upper.triu(1).T


class _Moments:
    """Running sums over real tokens of x xᵀ (with a constant input appended when `bias`), on the device of the
    activations. Rows are gathered until there are GRAM_ROWS, then multiplied at once in float32 (the upper blocks,
    `add_upper_gram`) and summed in float64: fewer, larger products than one a batch."""

    def __init__(self, size: int, bias: bool):
        self.size, self.bias = size, bias
        self.upper: torch.Tensor | None = None  # float64 [n, n], filled on and above the diagonal
        self.pending: list[torch.Tensor] = []  # rows not multiplied yet, float32 [N_i, n]
        self.pending_rows = 0
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:  # x [N, size]
        if self.bias:
            x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        self.pending.append(x.float())
        self.pending_rows += len(x)
        self.tokens += len(x)
        if self.pending_rows >= GRAM_ROWS:
            self._multiply_pending()

    def _multiply_pending(self) -> None:
        if not self.pending:
            return
        x = torch.cat(self.pending)
        self.pending, self.pending_rows = [], 0
        if self.upper is None:
            n = self.size + self.bias
            self.upper = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        add_upper_gram(self.upper, x, GRAM_BLOCK)

    @property
    def gram(self) -> torch.Tensor:
        """Σ x xᵀ over every row added, float64 [n (+1), n (+1)], exactly symmetric."""
        self._multiply_pending()
        return mirrored(self.upper)

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


def _output_energy(weight: torch.Tensor, gram: torch.Tensor) -> float:
    """E‖W x‖² = tr(W C Wᵀ) for `weight` [out, n] and the Gram C [n, n]; in float32, a diagnostic that needs no
    more (float64 would cost a third of a width repair on a CPU)."""
    weight = weight.float()
    return float(((weight @ gram.float()) * weight).sum())


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
    # W_R C_RK (C_KK + λI)⁻¹ [out, |K|], solved for the |R| cut columns' right-hand sides, not the out rows
    correction = weight[:, cut] @ _solve_spd(system, c_kr).T
    repaired = torch.zeros_like(weight)
    repaired[:, keep] = weight[:, keep] + correction
    energy = max(_output_energy(weight, gram), 1e-300)
    before = _output_energy(weight[:, cut], gram[cut][:, cut])  # the plain cut: Δ is the cut columns alone
    return repaired, before / energy, _output_energy(weight - repaired, gram) / energy


def _layer_chunks(sizes: list[int]) -> list[list[int]]:
    """Consecutive indices of modules grouped so that each group's Grams (`sizes`, bytes) fit GRAM_BYTES (one
    module at least)."""
    chunks: list[list[int]] = [[]]
    used = 0
    for index, size in enumerate(sizes):
        if chunks[-1] and used + size > GRAM_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(index)
        used += size
    return chunks


def _width_consumers(model: nn.Module, adapter: DecoderAdapter) -> dict[str, nn.Linear]:
    """The modules a width cut re-fits, by path from the layer list: every layer's o_proj and down_proj."""
    return {f"{i}.{path}": layer.get_submodule(path) for i, layer in enumerate(adapter.layers(model))
            for path in ("self_attn.o_proj", "mlp.down_proj")}


def _gram_bytes(linear: nn.Linear) -> int:
    """What one module's `_Moments` holds at most: the float64 Gram and GRAM_ROWS float32 rows."""
    return 8 * (linear.in_features + 1) ** 2 + 4 * GRAM_ROWS * (linear.in_features + 1)


@contextmanager
def recorded_width_moments(model: nn.Module, adapter: DecoderAdapter, enabled: bool = True
                           ) -> Iterator[dict[str, _Moments]]:
    """Record, during the forward passes run inside the block (the width criterion's pass over the calibration
    batches), the Grams of the inputs of every module a width cut re-fits, at real tokens: `width_repair` then
    needs no pass of its own. Yields {path: moments}, empty when not `enabled` or when the Grams of all layers
    would not fit in GRAM_BYTES (`width_repair` then reads them in passes of its own, a chunk of layers at a
    time). The model must be called with an `attention_mask` keyword, as every calibration pass here is."""
    consumers = _width_consumers(model, adapter)
    if not enabled or sum(map(_gram_bytes, consumers.values())) > GRAM_BYTES:
        yield {}
        return
    moments = {path: _Moments(linear.in_features, linear.bias is not None) for path, linear in consumers.items()}
    real: list[torch.Tensor] = []

    def read_mask(module, args, kwargs):
        real[:] = [kwargs["attention_mask"].bool()]

    def read_input(path: str):
        def read(module, args):
            moments[path].add(args[0][real[0].to(args[0].device)])

        return read

    handles = [model.register_forward_pre_hook(read_mask, with_kwargs=True)]
    handles += [linear.register_forward_pre_hook(read_input(path)) for path, linear in consumers.items()]
    try:
        yield moments
    finally:
        for handle in handles:
            handle.remove()


def width_repair(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], groups: list[list[int]],
                 neurons: list[list[int]], settings: CompensationSettings,
                 moments: dict[str, _Moments] | None = None) -> Repair:
    """The repair of cutting, in every layer i, KV groups `groups[i]` (their n_rep query heads' o_proj input
    columns) and MLP neurons `neurons[i]` (down_proj input columns) from `model`. `moments`: the Grams
    `recorded_width_moments` took over `batches` on this model; without them, passes over `batches` read them."""
    shape = adapter.shape(model)
    layers = adapter.layers(model)
    consumers = _width_consumers(model, adapter)
    keeps: dict[str, torch.Tensor] = {}  # path → which inputs stay, bool [in_features]
    for i in range(len(layers)):
        if groups[i]:
            keep = torch.ones(shape.kv_heads, dtype=torch.bool)
            keep[groups[i]] = False
            keeps[f"{i}.self_attn.o_proj"] = keep.repeat_interleave(shape.n_rep * shape.head_dim)
        if neurons[i]:
            keep = torch.ones(shape.intermediate, dtype=torch.bool)
            keep[neurons[i]] = False
            keeps[f"{i}.mlp.down_proj"] = keep
    repair = Repair()
    for path, m in width_moments(model, adapter, batches, list(keeps), moments):
        linear = consumers[path]
        keep = torch.cat([keeps[path], keeps[path].new_ones(1)]) if m.bias else keeps[path]  # the constant stays
        gram = m.mean
        keep = keep.to(gram.device)
        weight, before, after = refit_columns(_full_weight(linear, gram.device), gram, keep, settings.ridge)
        repair.weights[path] = (weight[:, :-1] if m.bias else weight, weight[:, -1] if m.bias else None)
        layer, module = path.split(".", 1)
        repair.records.append({"layer": int(layer), "module": module, "error_before": before,
                               "error_after": after, "tokens": m.tokens})
    return repair


def width_moments(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], paths: list[str],
                  moments: dict[str, _Moments] | None = None) -> Iterator[tuple[str, _Moments]]:
    """(path, moments) of the inputs of the width consumers `paths` (`_width_consumers`' keys) over `batches`:
    from `moments` (filled by `recorded_width_moments`) when given, else read by passes of their own, a chunk of
    layers within GRAM_BYTES at a time, each chunk's Grams dropped before the next is read."""
    if moments:
        yield from ((path, moments[path]) for path in paths)
        return
    consumers = _width_consumers(model, adapter)
    for chunk in _layer_chunks([_gram_bytes(consumers[p]) for p in paths]):
        chunk_moments = {paths[c]: _Moments(consumers[paths[c]].in_features, consumers[paths[c]].bias is not None)
                         for c in chunk}
        _calibration_pass(model, batches, [(consumers[p], "pre", m.add) for p, m in chunk_moments.items()])
        yield from chunk_moments.items()


def width_elimination_orders(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch],
                             moments: dict[str, _Moments] | None, ridge: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the `elimination_order` of its KV groups (o_proj's input columns of their n_rep query
    heads) and of its MLP neurons (down_proj's input columns, 64 rounds), [kv_heads] and [intermediate]
    float64, from the Grams over `batches` (`moments`: see `width_moments`)."""
    shape = adapter.shape(model)
    layers = adapter.layers(model)
    group_columns = torch.arange(shape.heads * shape.head_dim).view(shape.kv_heads, -1)  # [kv_heads, n_rep·d_h]
    neuron_columns = torch.arange(shape.intermediate)[:, None]  # [intermediate, 1]
    per_round = {"self_attn.o_proj": 1, "mlp.down_proj": max(1, shape.intermediate // 64)}
    paths = [f"{i}.{module}" for i in range(len(layers)) for module in per_round]
    orders: dict[str, torch.Tensor] = {}
    for path, m in width_moments(model, adapter, batches, paths, moments):
        index, module = path.split(".", 1)
        gram = m.mean
        weight = _full_weight(layers[int(index)].get_submodule(module), gram.device)
        columns = group_columns if module == "self_attn.o_proj" else neuron_columns
        orders[path] = elimination_order(weight, gram, columns, ridge, per_round[module])
    return [(orders[f"{i}.self_attn.o_proj"], orders[f"{i}.mlp.down_proj"]) for i in range(len(layers))]


def elimination_order(weight: torch.Tensor, gram: torch.Tensor, unit_columns: torch.Tensor, ridge: float,
                      per_round: int = 1) -> torch.Tensor:
    """The order in which greedy elimination with least-squares repair removes the units of a module (Optimal
    Brain Surgeon for structures, as in SlimGPT and ZipLM). `weight` [out, n] (float64) reads inputs of second
    moment `gram` [n, n]; unit u owns the input columns `unit_columns[u]` [U, c] (columns of no unit, such as a
    bias's constant input, are never removed). Each round removes the `per_round` units whose removal, with
    every remaining column re-fitted, costs least output energy,

        cost(u) = tr(W_u [(C + λI)⁻¹]_uu⁻¹ W_uᵀ),   λ = ridge · mean(diag C),

    then applies that re-fit to W and restricts the inverse to what is left. Returns each unit's round-wise rank
    [U] float64 (0: removed first; within a round, by cost)."""
    n = len(gram)
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram + lam * eye))  # [n, n]
    weight = weight.clone()
    units = unit_columns.to(gram.device)  # [U_alive, c], positions into the columns still held
    alive = torch.arange(len(unit_columns))
    rank = torch.empty(len(unit_columns), dtype=torch.float64)
    removed = 0
    while len(alive):
        w = weight[:, units].permute(1, 0, 2)  # [U_alive, out, c]
        block = inverse[units[:, :, None], units[:, None, :]]  # [U_alive, c, c]
        cost = (w * torch.linalg.solve(block, w.transpose(1, 2)).transpose(1, 2)).sum((1, 2))  # [U_alive]
        order = torch.sort(cost, stable=True).indices[:per_round]
        rank[alive[order]] = torch.arange(removed, removed + len(order), dtype=torch.float64)
        removed += len(order)
        cut = units[order].flatten()  # positions of the removed columns
        solved = torch.linalg.solve(inverse[cut][:, cut], inverse[cut])  # [r, n]
        weight = weight - weight[:, cut] @ solved
        inverse = inverse - inverse[:, cut] @ solved
        keep = torch.ones(weight.shape[1], dtype=torch.bool, device=gram.device)
        keep[cut] = False
        survivors = torch.ones(len(alive), dtype=torch.bool)
        survivors[order] = False
        position = torch.cumsum(keep, 0) - 1  # old position → new position among the kept columns
        weight, inverse = weight[:, keep], inverse[keep][:, keep]
        units, alive = position[units[survivors.to(units.device)]], alive[survivors]
    return rank


class _DepthMoments:
    """What the depth repair of removing a run of layers needs, summed over real tokens: the Gram of the down_proj
    input h of the layer before the run (with a constant appended when that down_proj has a bias), Σ Δ [h; 1]ᵀ
    for the run's update Δ = x_out − x_in [N, d], and the energies of Δ and x_out."""

    def __init__(self, down: nn.Linear):
        self.down = down
        self.h = _Moments(down.in_features, down.bias is not None)
        self.cross: torch.Tensor | None = None  # float64 [d, inter (+1)]
        self.delta_energy = self.out_energy = 0.0
        self.features: torch.Tensor | None = None  # the current batch's [h; 1], [N, inter (+1)]

    def read_h(self, h: torch.Tensor) -> None:
        self.features = torch.cat([h, h.new_ones(len(h), 1)], 1) if self.h.bias else h
        self.h.add(h)

    def read_update(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        delta = (x_out - x_in).float()
        product = (delta.T @ self.features.float()).double()
        self.cross = product if self.cross is None else self.cross + product
        self.delta_energy += float(delta.double().square().sum())
        self.out_energy += float(x_out.double().square().sum())

    def correction(self, ridge: float) -> torch.Tensor:
        """D = C_Δh (C_hh + λI)⁻¹ [d, inter (+1)], float64: what the re-fit adds to the down_proj weight."""
        c_hh = self.h.mean
        lam = ridge * c_hh.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(len(c_hh), dtype=c_hh.dtype, device=c_hh.device)
        return _solve_spd(c_hh + lam * eye, self.cross.T / max(self.h.tokens, 1)).T

    def error(self, correction: torch.Tensor) -> float:
        """E‖Δ − D h‖² / E‖x_out‖² on these moments' tokens for a correction D (fitted on these or others):
        E‖Δ‖² − 2 tr(D C_hΔ) + tr(D C_hh Dᵀ) over the output's energy."""
        n = max(self.h.tokens, 1)
        residual = (self.delta_energy / n - 2 * float((correction * (self.cross / n)).sum())
                    + _output_energy(correction, self.h.mean))
        return max(residual, 0.0) / max(self.out_energy / n, 1e-300)

    def fit(self, ridge: float) -> tuple[torch.Tensor, float, float]:
        """The re-fitted down_proj weight [d, inter (+1)] (float64, the bias as a last column), and the relative
        errors E‖Δ − D h‖² / E‖x_out‖² before (D = 0: the plain cut) and after."""
        correction = self.correction(ridge)
        before = self.delta_energy / max(self.out_energy, 1e-300)
        return _full_weight(self.down, correction.device) + correction, before, self.error(correction)


def depth_repair(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], index: int,
                 settings: CompensationSettings, count: int = 1) -> Repair:
    """The repair of removing decoder layers index … index+count−1 (a run) from `model`: layer index−1's
    down_proj re-fitted so that its output also carries the run's update Δ (see the module doc)."""
    removed = list(range(index, index + count))
    if index == 0:
        return Repair(records=[{"layers": removed, "module": None, "skipped": "no layer before it to fold a repair into"}])
    layers = adapter.layers(model)
    down = layers[index - 1].mlp.down_proj
    moments = _DepthMoments(down)
    run_input: list[torch.Tensor] = []  # the run's first layer's input, [N, d]
    hooks = [(down, "pre", moments.read_h), (layers[index], "pre", lambda x: run_input.__setitem__(slice(None), [x])),
             (layers[index + count - 1], "post", lambda x_in, x_out: moments.read_update(run_input[0], x_out))]
    _calibration_pass(model, batches, hooks)
    refitted, before, after = moments.fit(settings.depth_ridge)
    repair = Repair()
    repair.weights[f"{index - 1}.mlp.down_proj"] = (refitted[:, :-1], refitted[:, -1]) if moments.h.bias \
        else (refitted, None)
    repair.records.append({"layers": removed, "module": f"{index - 1}.mlp.down_proj", "error_before": before,
                           "error_after": after, "tokens": moments.h.tokens})
    return repair


def depth_repair_errors(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], ridge: float
                        ) -> torch.Tensor:
    """Per decoder layer ℓ, the relative error E‖Δ_ℓ − D h_ℓ−1‖² / E‖x_out‖² that `depth_repair` would leave if ℓ
    alone were removed, [n_layers] float64; layer 0, which gets no repair, scores its plain E‖Δ_0‖² / E‖x_out‖².
    Passes over `batches`, each holding the Grams of a chunk of layers within GRAM_BYTES."""
    layers = adapter.layers(model)
    errors = torch.zeros(len(layers), dtype=torch.float64)
    first = {"delta": 0.0, "out": 0.0}

    def read_first(x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        first["delta"] += float((x_out - x_in).double().square().sum())
        first["out"] += float(x_out.double().square().sum())

    downs = [layer.mlp.down_proj for layer in layers[:-1]]  # downs[i − 1] is what removing layer i re-fits
    sizes = [_gram_bytes(down) + 8 * down.out_features * (down.in_features + 1) for down in downs]
    for number, chunk in enumerate(_layer_chunks(sizes)):
        moments = {1 + c: _DepthMoments(downs[c]) for c in chunk}
        hooks = [(layers[0], "post", read_first)] if number == 0 else []
        for i, m in moments.items():
            hooks += [(m.down, "pre", m.read_h), (layers[i], "post", m.read_update)]
        _calibration_pass(model, batches, hooks)
        for i, m in moments.items():
            errors[i] = m.fit(ridge)[2]
    errors[0] = first["delta"] / max(first["out"], 1e-300)
    return errors


def repair_for(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], settings: CompensationSettings,
               width: dict | None = None, layer: int | None = None, count: int = 1,
               moments: dict[str, _Moments] | None = None) -> Repair | None:
    """The repair of cutting `width` units ({"groups", "neurons"} per layer) or the `count` decoder layers
    from `layer` on from `model` (`moments`: see `width_repair`); None when `settings` asks for none."""
    if not settings.enabled:
        return None
    if width is not None:
        return width_repair(model, adapter, batches, width["groups"], width["neurons"], settings, moments)
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
    return {"compensation": {"method": settings.method, "ridge": settings.ridge,
                             "depth_ridge": settings.depth_ridge, "repairs": repairs,
                             "mean_error_before": mean("error_before"), "mean_error_after": mean("error_after")}}
