"""A measured latency model of the device: how long a uniform checkpoint of a given shape takes, at batch 1.

Every decoder layer of our checkpoints has the same shape, so each timed quantity is modelled as

    seconds = fixed + layers · (per_layer + per_query_head · heads + per_kv_head · kv_heads
                                + per_neuron · intermediate)

`fixed` holds the embeddings, the final norm, the lm_head and the loop's own overhead; `per_layer` the norms,
residual adds and per-module call overhead of a layer; the other terms the projections, attention and KV cache
per query head and per KV head, and the MLP per neuron. Three quantities get their own coefficients, all read
from the same runs of the paper's protocol (`mop.latency.protocol`):

- `decode`: seconds per decoded token (the protocol's decode time / (new_tokens − 1));
- `prefill`: seconds of one forward pass over a `prefill_tokens`-long prompt;
- `end_to_end`: seconds of the protocol's prompt and `new_tokens` tokens (what `mop bench`'s speedup divides).

The coefficients are fitted by non-negative least squares on relative residuals, on random-weight models of a few
synthetic shapes built from the dense model's config (`synthetic_shapes`), on the run's device, dtype and engine,
and cached per (config, device, dtype, engine, settings) as JSON under `$MOP_CACHE_DIR/latency/`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig

from mop.errors import MopError
from mop.latency.protocol import Clock, LatencySettings, describe_device, measure_on
from mop.models.adapters import ADAPTERS, DecoderAdapter, adapter_for, check_architecture
from mop.models.loading import DTYPES, cache_dir, read_config, resolve_model_dir
from mop.provenance import versions, write_json_atomic

log = logging.getLogger(__name__)

FORM = ("seconds = fixed + layers * (per_layer + per_query_head * heads + per_kv_head * kv_heads "
        "+ per_neuron * intermediate)")
QUANTITIES = ("decode", "prefill", "end_to_end")
ENGINES = ("transformers", "vllm")
# the protocol's prompts and token counts, fewer runs: 3 kept runs per synthetic shape
FIT_SETTINGS = LatencySettings(runs=5, warmup=2, time_generate=False)
# synthetic models timed together weigh at most this many times the dense one (`time_shapes`)
GROUP_BYTES_FACTOR = 3
# how the synthetic shapes are timed: part of a latency model's context, so models fitted otherwise are not reused
TIMING = "alternating, in groups anchored on the dense shape"


@dataclass(frozen=True)
class ModelShape:
    """What a uniform checkpoint's latency depends on: every decoder layer has the same widths."""

    layers: int
    heads: int  # query heads per layer
    kv_heads: int  # KV groups per layer
    head_dim: int
    intermediate: int  # MLP neurons per layer
    hidden: int
    vocab: int

    @property
    def n_rep(self) -> int:
        """Query heads per KV group."""
        return self.heads // self.kv_heads

    def validate(self) -> None:
        if min(asdict(self).values()) < 1 or self.heads % self.kv_heads:
            raise MopError(f"not a model shape: {self} (every size ≥ 1, heads a multiple of kv_heads)")

    def label(self) -> str:
        return f"L{self.layers} H{self.heads}/KV{self.kv_heads} I{self.intermediate}"


def model_shape(model: nn.Module, adapter: DecoderAdapter | None = None) -> ModelShape:
    """The shape of a loaded model (read from its modules through its adapter)."""
    adapter = adapter or adapter_for(model)
    layer = adapter.shape(model)
    return ModelShape(layers=len(adapter.layers(model)), heads=layer.heads, kv_heads=layer.kv_heads,
                      head_dim=layer.head_dim, intermediate=layer.intermediate, hidden=layer.hidden,
                      vocab=adapter.text_config(model).vocab_size)


def checkpoint_shape(name: str) -> ModelShape:
    """The shape of a checkpoint (a name as `load_model` takes it), from its config alone: the model is built on
    the meta device, so no weight is read or allocated."""
    config = read_config(resolve_model_dir(name))
    architecture = check_architecture(config)
    with torch.device("meta"):
        model = getattr(transformers, architecture)._from_config(config)
    return model_shape(model, ADAPTERS[architecture])


def config_shape(config: PretrainedConfig) -> ModelShape:
    """The shape of the causal LM that a (text) config describes, built on the meta device."""
    with torch.device("meta"):
        return model_shape(AutoModelForCausalLM.from_config(config))


@dataclass(frozen=True)
class Coefficients:
    """One quantity's seconds as a linear function of the shape (see FORM); all ≥ 0."""

    fixed: float
    per_layer: float
    per_query_head: float  # per query head of one layer
    per_kv_head: float  # per KV head of one layer
    per_neuron: float  # per MLP neuron of one layer

    def seconds(self, shape: ModelShape) -> float:
        return sum(c * f for c, f in zip(asdict(self).values(), features(shape), strict=True))


def features(shape: ModelShape) -> list[float]:
    """What each coefficient multiplies: [1, L, L·H, L·KV, L·I]."""
    layers = shape.layers
    return [1.0, layers, layers * shape.heads, layers * shape.kv_heads, layers * shape.intermediate]


@dataclass(frozen=True)
class UnitLatency:
    """Seconds saved by one pruning unit, removed from a given shape."""

    layer: float  # one decoder layer
    kv_group: float  # one KV group with its n_rep query heads, from every layer
    neuron: float  # one MLP neuron, from every layer


@dataclass(frozen=True)
class ShapeTiming:
    """Measured seconds of one shape, per quantity (QUANTITIES)."""

    shape: ModelShape
    seconds: dict[str, float]


@dataclass
class LatencyModel:
    coefficients: dict[str, Coefficients]  # per quantity
    timings: list[ShapeTiming]  # what it was fitted on
    context: dict  # what it was measured on (config, device, dtype, engine, settings); the cache key

    def seconds(self, shape: ModelShape, of: str = "end_to_end") -> float:
        shape.validate()
        return self.coefficients[_quantity(of)].seconds(shape)

    def decode_seconds(self, shape: ModelShape) -> float:
        """Seconds per decoded token at batch 1."""
        return self.seconds(shape, "decode")

    def prefill_seconds(self, shape: ModelShape) -> float:
        """Seconds of one forward pass over a `context["settings"]["prefill_tokens"]`-long prompt."""
        return self.seconds(shape, "prefill")

    def speedup(self, dense: ModelShape, shape: ModelShape, of: str = "end_to_end") -> float:
        """Predicted dense seconds / `shape` seconds (`mop bench`'s speedup for the default `of`)."""
        return self.seconds(dense, of) / self.seconds(shape, of)

    def unit_latency(self, shape: ModelShape, of: str = "end_to_end") -> UnitLatency:
        """Predicted seconds saved by removing one layer, one KV group (with its n_rep query heads) from every
        layer, or one neuron from every layer, of `shape`. The model is linear, so these are exact differences."""
        shape.validate()
        c = self.coefficients[_quantity(of)]
        layer = c.per_layer + c.per_query_head * shape.heads + c.per_kv_head * shape.kv_heads \
            + c.per_neuron * shape.intermediate
        return UnitLatency(layer=layer, kv_group=shape.layers * (c.per_kv_head + shape.n_rep * c.per_query_head),
                           neuron=shape.layers * c.per_neuron)

    def record(self) -> dict:
        """A JSON-ready record (for `mop.json` and the cache): the form, the coefficients, and every fitted shape
        with its measured and predicted seconds and relative error."""
        fit = [{"shape": asdict(t.shape), "measured": t.seconds,
                "predicted": {q: self.seconds(t.shape, q) for q in QUANTITIES},
                "relative_error": {q: self.seconds(t.shape, q) / t.seconds[q] - 1 for q in QUANTITIES}}
               for t in self.timings]
        worst = {q: max(abs(row["relative_error"][q]) for row in fit) for q in QUANTITIES}
        return {"form": FORM, "context": self.context,
                "coefficients": {q: asdict(c) for q, c in self.coefficients.items()},
                "max_abs_relative_error": worst, "fit": fit}

    def digest(self) -> str:
        """A short digest of `record()`: what a run's identity holds of its latency model."""
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_record(cls, record: dict) -> LatencyModel:
        return cls({q: Coefficients(**c) for q, c in record["coefficients"].items()},
                   [ShapeTiming(ModelShape(**row["shape"]), row["measured"]) for row in record["fit"]],
                   record["context"])


def _quantity(of: str) -> str:
    if of not in QUANTITIES:
        raise MopError(f"unknown latency quantity {of!r}; choose one of {', '.join(QUANTITIES)}")
    return of


def nonnegative_least_squares(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-12) -> torch.Tensor:
    """argmin ‖a x − b‖ subject to x ≥ 0 (Lawson and Hanson's active set method); a [rows, n], b [rows] → [n].
    Coefficients enter the free set one at a time by the largest gradient; a free one that the unconstrained
    solution would make negative stops the step at the boundary and returns to zero."""
    n = a.shape[1]
    x = torch.zeros(n, dtype=a.dtype)
    free = torch.zeros(n, dtype=torch.bool)
    scale = tolerance * float(a.abs().max() * b.abs().max())
    for _ in range(3 * n):
        gradient = a.T @ (b - a @ x)
        gradient[free] = -math.inf
        if gradient.max() <= scale:
            break
        free[gradient.argmax()] = True
        while True:
            z = torch.zeros(n, dtype=a.dtype)
            z[free] = torch.linalg.lstsq(a[:, free], b.unsqueeze(1)).solution.squeeze(1)
            if (z[free] > 0).all():
                x = z
                break
            blocked = free & (z <= 0)
            step = (x[blocked] / (x[blocked] - z[blocked]).clamp_min(torch.finfo(a.dtype).tiny)).min()
            x = x + step * (z - x)
            free &= x > 0
            x[~free] = 0
    return x


def fit_latency_model(timings: list[ShapeTiming], context: dict | None = None) -> LatencyModel:
    """Fit every quantity's coefficients to `timings` by non-negative least squares on relative residuals
    (each row divided by its measured seconds, so small and large shapes count alike)."""
    if len(timings) < len(Coefficients.__dataclass_fields__):
        raise MopError(f"{len(timings)} timed shapes cannot fit {len(Coefficients.__dataclass_fields__)} "
                       "coefficients")
    for timing in timings:
        timing.shape.validate()
        seconds = [timing.seconds.get(q, math.nan) for q in QUANTITIES]
        if not all(math.isfinite(s) and s > 0 for s in seconds):
            raise MopError(f"{timing.shape.label()}: every quantity ({', '.join(QUANTITIES)}) needs a positive "
                           f"finite time, not {timing.seconds}")
    fixed_widths = {(t.shape.head_dim, t.shape.hidden, t.shape.vocab) for t in timings}
    if len(fixed_widths) > 1:
        raise MopError(f"the timed shapes must share head_dim, hidden and vocab (one model's), not {fixed_widths}")
    design = torch.tensor([features(t.shape) for t in timings], dtype=torch.float64)
    column_scale = design.abs().amax(dim=0)
    if torch.linalg.matrix_rank(design / column_scale) < design.shape[1]:
        raise MopError("the timed shapes do not identify the coefficients: vary the layers, query heads per KV "
                       "group, KV heads and neurons independently (see synthetic_shapes)")
    coefficients = {}
    for quantity in QUANTITIES:
        measured = torch.tensor([t.seconds[quantity] for t in timings], dtype=torch.float64)
        relative = design / column_scale / measured.unsqueeze(1)
        x = nonnegative_least_squares(relative, torch.ones_like(measured)) / column_scale
        coefficients[quantity] = Coefficients(*x.tolist())
    return LatencyModel(coefficients, list(timings), context or {})


def synthetic_shapes(dense: ModelShape) -> list[ModelShape]:
    """Seven shapes around `dense` that identify the coefficients: the dense shape; half and quarter depth; and at
    half depth fewer KV groups, another number of query heads per group (1, or 2 for MHA), and a quarter of the
    neurons; and a small corner. Width ratios, not just the dense one, so the fit sees each term move alone."""
    dense.validate()
    half = max(2, dense.layers // 2)
    quarter = max(1, half // 2)
    fewer_groups = dense.kv_heads // 2 if dense.kv_heads > 1 else 2
    other_rep = 1 if dense.n_rep > 1 else 2
    rep = dense.n_rep

    def shape(layers: int, kv_heads: int, n_rep: int, intermediate: int) -> ModelShape:
        return replace(dense, layers=layers, heads=kv_heads * n_rep, kv_heads=kv_heads,
                       intermediate=max(1, intermediate))

    return [shape(dense.layers, dense.kv_heads, rep, dense.intermediate),
            shape(half, dense.kv_heads, rep, dense.intermediate),
            shape(quarter, dense.kv_heads, rep, dense.intermediate),
            shape(half, fewer_groups, rep, dense.intermediate),
            shape(half, dense.kv_heads, other_rep, dense.intermediate),
            shape(half, dense.kv_heads, rep, dense.intermediate // 4),
            shape(quarter, fewer_groups, rep, dense.intermediate // 2)]


def shaped_config(config: PretrainedConfig, shape: ModelShape) -> PretrainedConfig:
    """A copy of a (text) config with `shape`'s layer count and widths. Set as attributes: the config classes
    check head counts against hidden_size only when constructed, and pruned checkpoints need not satisfy it."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = shape.layers
    config.num_attention_heads = shape.heads
    config.num_key_value_heads = shape.kv_heads
    config.head_dim = shape.head_dim
    config.intermediate_size = shape.intermediate
    if getattr(config, "layer_types", None) is not None:  # Qwen2: one attention type per layer
        config.layer_types = (config.layer_types * shape.layers)[:shape.layers]
    return config


def synthetic_model(config: PretrainedConfig, shape: ModelShape, device: str, dtype: str) -> nn.Module:
    """A random-weight causal LM of `config`'s family with `shape`, on `device` in `dtype`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shaped_config(config, shape), dtype=DTYPES[dtype])
    return model.eval()


# times a group of shapes together: shape → seconds per quantity (QUANTITIES)
GroupTimer = Callable[[list[ModelShape]], dict[ModelShape, dict[str, float]]]


def time_shapes(config: PretrainedConfig, shapes: list[ModelShape], dtype: str, time_group: GroupTimer) \
        -> list[ShapeTiming]:
    """Each shape timed by `time_group` (`in_transformers`, `in_vllm`) together with others, alternating run by run
    as `mop bench` alternates a checkpoint and the dense model, so that a slow spell of the machine falls on every
    shape alike. The shapes go in groups whose weights fit GROUP_BYTES_FACTOR × the first shape's (the dense one);
    every group holds the first shape, and its times are rescaled so that the first shape's equal those of the
    first group."""
    size = {shape: _weight_bytes(config, shape, dtype) for shape in shapes}
    seconds: dict[ModelShape, dict[str, float]] = {}
    rest = list(shapes[1:])
    while rest or not seconds:
        group = [shapes[0]]
        while rest and (len(group) == 1 or sum(size[s] for s in group) + size[rest[0]]
                        <= GROUP_BYTES_FACTOR * size[shapes[0]]):
            group.append(rest.pop(0))
        measured = time_group(group)
        reference = seconds.get(shapes[0], measured[shapes[0]])
        for shape in group:
            seconds.setdefault(shape, {q: measured[shape][q] * reference[q] / measured[shapes[0]][q]
                                       for q in QUANTITIES})
    return [ShapeTiming(shape, seconds[shape]) for shape in shapes]


def in_transformers(config: PretrainedConfig, settings: LatencySettings, device: str, dtype: str,
                    clock: Clock = time.perf_counter) -> GroupTimer:
    """Times a group as random-weight models in our greedy loop (`measure_on`), on prompt ids 0, 1, 2, … (timing
    does not depend on which tokens); the first shape's model is built once and kept for every group."""
    prompt = torch.arange(settings.prompt_tokens).unsqueeze(0) % config.vocab_size
    long_prompt = torch.arange(settings.prefill_tokens).unsqueeze(0) % config.vocab_size
    built: dict[ModelShape, nn.Module] = {}

    def time_group(group: list[ModelShape]) -> dict[ModelShape, dict[str, float]]:
        anchor = built.setdefault(group[0], synthetic_model(config, group[0], device, dtype))
        models = {shape.label(): anchor if shape == group[0] else synthetic_model(config, shape, device, dtype)
                  for shape in group}
        timed = measure_on(models, prompt, long_prompt, settings, clock)
        return {shape: _seconds(timed[shape.label()], settings) for shape in group}

    return time_group


def in_vllm(config: PretrainedConfig, tokenizer, settings: LatencySettings, dtype: str) -> GroupTimer:
    """Times a group as random-weight checkpoints (with `tokenizer`, so that vLLM detokenizes as it does for real
    ones) written to a temporary folder and served side by side in vLLM (`time_in_vllm`), on prompt ids 0, 1, 2, …;
    a quantity's seconds are those of `mop bench --engine vllm`, and prefill is a 1-token request on a
    `prefill_tokens`-long prompt."""
    from mop.latency.vllm_bench import time_in_vllm, vllm_python

    python = vllm_python()
    prompt = [i % config.vocab_size for i in range(settings.prompt_tokens)]
    long_prompt = [i % config.vocab_size for i in range(settings.prefill_tokens)]
    kept = settings.warmup

    def time_group(group: list[ModelShape]) -> dict[ModelShape, dict[str, float]]:
        with tempfile.TemporaryDirectory(prefix="mop-latency-vllm-") as work:
            directories = {}
            for shape in group:
                directories[shape.label()] = Path(work) / shape.label().replace(" ", "_").replace("/", "-")
                synthetic_model(config, shape, "cpu", dtype).save_pretrained(directories[shape.label()])
                tokenizer.save_pretrained(directories[shape.label()])
            with tqdm(total=1, desc=f"latency in vLLM: {' and '.join(directories)}", unit="group") as bar:
                raw = time_in_vllm(directories, prompt, settings, dtype, python, prefill_prompt=long_prompt,
                                   max_model_len=settings.prefill_tokens + settings.new_tokens)["raw"]
                bar.update()
        seconds = {}
        for shape in group:
            runs = raw[shape.label()]
            decode = [(e - f) / (settings.new_tokens - 1)
                      for e, f in zip(runs["end_to_end_s"][kept:], runs["first_token_s"][kept:], strict=True)]
            seconds[shape] = {"decode": statistics.fmean(decode), "prefill": statistics.fmean(runs["prefill_s"][kept:]),
                              "end_to_end": statistics.fmean(runs["end_to_end_s"][kept:])}
        return seconds

    return time_group


def _weight_bytes(config: PretrainedConfig, shape: ModelShape, dtype: str) -> int:
    """The bytes of `shape`'s weights in `dtype` (counted on the meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shaped_config(config, shape), dtype=DTYPES[dtype])
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _seconds(result: dict, settings: LatencySettings) -> dict[str, float]:
    """A protocol summary (`measure_on`'s, one model) as seconds per quantity (QUANTITIES)."""
    prefill = result["raw"]["long_prefill_s"][settings.warmup:]
    return {"decode": result["decode_ms_per_token"]["mean"] / 1000, "prefill": sum(prefill) / len(prefill),
            "end_to_end": result["end_to_end_s"]["mean"]}


def measurement_context(config: PretrainedConfig, settings: LatencySettings, device: str, dtype: str,
                        engine: str) -> dict:
    """What a latency model holds for: the model's config as far as it decides the compute, the device (with
    torch's thread count), dtype, engine with the library versions, and the protocol settings."""
    if engine == "vllm":
        from mop.latency.vllm_bench import vllm_device, vllm_version

        machine = {"device": vllm_device(), "versions": {"vllm": vllm_version()}}
    else:
        machine = {"device": describe_device(torch.device(device)), "torch_threads": torch.get_num_threads(),
                   "versions": {name: version for name, version in versions().items()
                                if name in ("torch", "transformers")}}
    return {"model_type": config.model_type, "dense_shape": asdict(config_shape(config)),
            "biases": {"attention": bool(getattr(config, "attention_bias", False)),
                       "mlp": bool(getattr(config, "mlp_bias", False))},
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "dtype": dtype, "engine": engine, "settings": asdict(settings), "timing": TIMING} | machine


def cache_path(context: dict, cache: Path | None = None) -> Path:
    """The cache file of a measurement context: `cache` (default `$MOP_CACHE_DIR/latency`, `~/.cache/mop/latency`
    when unset) / a digest of the context `.json`."""
    digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
    return (cache or cache_dir() / "latency") / f"{digest}.json"


def measure_latency_model(config: PretrainedConfig, settings: LatencySettings = FIT_SETTINGS, device: str = "cpu",
                          dtype: str = "float32", engine: str = "transformers", cache: Path | None = None,
                          refresh: bool = False, clock: Clock = time.perf_counter, tokenizer=None) -> LatencyModel:
    """The latency model of the causal LM that `config` describes (a loaded model's:
    `adapter.text_config(model)`), on `device` in `dtype` with `engine`: read from the cache when this context was
    measured before (unless `refresh`), else the `synthetic_shapes` timed by the protocol with `settings`
    (`time_generate` is not used and is switched off), fitted and cached. vLLM (its own environment, on the CPU
    build's device) times checkpoints on disk, which carry the model's `tokenizer`; `clock` is ours only."""
    if engine not in ENGINES:
        raise MopError(f"unknown engine {engine}; choose one of {', '.join(ENGINES)}")
    if engine == "vllm" and tokenizer is None:
        raise MopError("the vLLM latency model needs the model's tokenizer (its synthetic checkpoints carry it)")
    if dtype not in DTYPES:
        raise MopError(f"unknown dtype {dtype}; choose one of {', '.join(DTYPES)}")
    settings = replace(settings, time_generate=False)
    settings.validate()
    context = measurement_context(config, settings, device, dtype, engine)
    path = cache_path(context, cache)
    if path.is_file() and not refresh:
        record = json.loads(path.read_text())
        if record.get("context") == context:
            log.info("latency model of %s read from %s", context["device"], path)
            return LatencyModel.from_record(record)
        log.warning("%s holds another context's latency model; measuring again", path)
    dense = ModelShape(**context["dense_shape"])
    time_group = (in_vllm(config, tokenizer, settings, dtype) if engine == "vllm"
                  else in_transformers(config, settings, device, dtype, clock))
    model = fit_latency_model(time_shapes(config, synthetic_shapes(dense), dtype, time_group), context)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, model.record())
    log.info("latency model written to %s", path)
    return model
