"""`mop compare`: several pruning methods, each pruned to every target, recovered with the same budget and data,
evaluated on the same tasks and documents and timed with the same protocol, in one report.

    OUT/compare.json          the shared settings (a rerun with other settings is refused)
    OUT/dense/eval.json       the dense model, evaluated once for all methods
    OUT/<label>/              one `mop run` directory per method (pipeline.json, seed-S/...)
    OUT/report.md, OUT/results.json, OUT/*.png

A method is a preset name (`mop`, `depth`, `width`, `mop-kl`, `shortgpt`, ...; see PRESETS) or
`LABEL:field=value,...` with fields of `SearchConfig` (e.g. `mop-kl-fast:path_criterion=kl,tune_steps_per_iteration=1`),
`lora.FIELD=value` for the LoRA settings of the search's short tuning of candidates (e.g. `lora.max_length=256`)
and, for a variant recovered otherwise than the shared settings say, `recovery.FIELD=value` with fields of
`FinetuneConfig` or its `LoraSettings` (e.g. `mop-kd:recovery.method=kd,recovery.learning_rate=0.002`); the
report lists what each method sets.
Every stage is a file skipped when present, so adding a method, a seed or the latency stage computes only what is
missing; each invocation runs its `--seeds` for the methods it names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields, replace
from pathlib import Path

from mop import pipeline
from mop.errors import MopError
from mop.pipeline import PipelineConfig, check_targets, check_tasks, run_pipeline
from mop.pruning import methods as pruning_methods
from mop.pruning.search import SearchConfig
from mop.training import FinetuneConfig, LoraSettings

log = logging.getLogger(__name__)

PRESETS: dict[str, dict] = {
    "mop": {},  # the paper's default: random path, third-to-last layer, AMP
    "depth": {"mode": "depth"},
    "width": {"mode": "width"},
    "mop-kl": {"path_criterion": "kl"},
    "mop-cosine": {"path_criterion": "cosine"},
    "mop-ppl": {"path_criterion": "ppl"},
    "mop-bi": {"layer_criterion": "block_influence"},
    "depth-bi": {"mode": "depth", "layer_criterion": "block_influence"},
    "shortgpt": {"method": "shortgpt"},
    "llm-pruner": {"method": "llm-pruner"},
}
# what a preset may set of a search: not where it stops, how speed is predicted, the seed or the tuning's LoRA
_METHOD_FIELDS = {f.name for f in fields(SearchConfig)} - {"targets", "speedups", "latency_model", "latency_engine",
                                                           "seed", "lora"}
_RECOVERY_FIELDS = {f.name for f in fields(FinetuneConfig)} - {"seed", "lora"}
_LORA_FIELDS = {f.name for f in fields(LoraSettings)}
_FIELDS = _METHOD_FIELDS | {f"lora.{name}" for name in _LORA_FIELDS} \
    | {f"recovery.{name}" for name in _RECOVERY_FIELDS | _LORA_FIELDS}


def _value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_method(spec: str) -> tuple[str, dict]:
    """`NAME` (a preset) or `LABEL:field=value,...` → (label, the SearchConfig fields it sets, with the short
    tuning's LoRA fields under "lora" and the recovery fields under "recovery")."""
    label, _, settings = spec.partition(":")
    if not label or "/" in label or label in ("dense", "."):
        raise MopError(f"method {spec!r}: give a name (a preset, or LABEL:field=value,...)")
    if not settings:
        if label not in PRESETS:
            raise MopError(f"unknown method {label}; presets: {', '.join(PRESETS)}, or LABEL:field=value,...")
        return label, dict(PRESETS[label])
    overrides = {}
    for item in settings.split(","):
        key, equals, value = item.partition("=")
        if not equals or key not in _FIELDS:
            raise MopError(f"method {spec!r}: {item!r} is not field=value with a field of {', '.join(sorted(_FIELDS))}")
        group, dot, name = key.partition(".")
        if dot:
            overrides.setdefault(group, {})[name] = _value(value)
        else:
            overrides[key] = _value(value)
    return label, overrides


def method_config(base: PipelineConfig, overrides: dict) -> PipelineConfig:
    """The shared settings with a method's own: its search fields, its short tuning's LoRA fields and its
    recovery fields, where it sets some."""
    search = {k: v for k, v in overrides.items() if k not in ("lora", "recovery")}
    tuning = replace(base.search.lora, **overrides.get("lora", {}))
    config = replace(base, search=replace(base.search, **search, lora=tuning))
    config.search.validate()
    pruning_methods.known(config.search.method)
    if "recovery" in overrides:
        if base.recovery is None:
            raise MopError(f"recovery settings {overrides['recovery']} given, but the comparison has no recovery")
        lora = {k: v for k, v in overrides["recovery"].items() if k in _LORA_FIELDS}
        rest = {k: v for k, v in overrides["recovery"].items() if k not in _LORA_FIELDS}
        config.recovery = replace(base.recovery, **rest, lora=replace(base.recovery.lora, **lora))
        config.recovery.validate()
    return config


def shared_identity(base: PipelineConfig, model: str) -> dict:
    """What every method of one comparison must share: the model, recovery, tasks, documents, device, dtype."""
    identity = {"model": model, **base.identity()}
    identity.pop("search")
    return json.loads(json.dumps(identity))


def claim(out: Path, base: PipelineConfig, model: str) -> None:
    """Record the shared settings in OUT/compare.json, or refuse an OUT that holds something else."""
    pipeline.claim_directory(out, "compare.json", shared_identity(base, model), "comparison",
                             targets=base.search.targets, speedups=base.search.speedups)


def run_compare(model: str, base: PipelineConfig, methods: dict[str, dict], out: Path) -> dict:
    """Every method in `methods` (label → SearchConfig fields) through the pipeline into OUT/<label>; then the
    report over every method and seed found in OUT."""
    from mop.report import write_comparison

    configs = {label: method_config(base, overrides) for label, overrides in methods.items()}
    for config in configs.values():
        config.validate()
    check_tasks(base)
    check_targets(model, {out / label: config for label, config in configs.items()})
    claim(out, base, model)
    from mop.evaluation import evaluate
    from mop.models import load_model

    dense = out / "dense" / "eval.json"
    pipeline.stage(dense, lambda: evaluate(load_model(model, base.device, base.dtype), base.tasks, base.eval_limit,
                                           base.eval_batch_size, base.ppl_segment_length, ppl_segments=base.ppl_segments),
                   f"evaluate {model}")
    for label, config in configs.items():
        log.info("method %s: %s", label, methods[label] or "defaults")
        run_pipeline(model, config, out / label, dense=dense, report=False)
    return write_comparison(out, model)
