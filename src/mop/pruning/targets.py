"""Where a run stops: a target is a compression ratio (`--target 0.2`, checkpoint `target-20/`) or a predicted
speedup over the dense model (`--target-speedup 1.3`, checkpoint `speedup-130/`). Every method takes each target
at the first step whose model reaches it; `Goals` says whether a model does, and predicts speedups with the
run's latency model (`run_latency_model`: measured on the run's device and dtype, cached, recorded in run.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mop.errors import MopError
from mop.latency.model import LatencyModel, ModelShape, measure_latency_model, model_shape
from mop.models import LoadedModel, count_params, embedding_params, input_device
from mop.models.adapters import LayerShape
from mop.models.loading import DTYPES
from mop.pruning.state import RUN_FILE, target_name
from mop.pruning.width import UnitCosts

KINDS = ("compression", "speedup")


@dataclass(frozen=True, order=True)
class Target:
    kind: str  # one of KINDS
    value: float  # a compression ratio in (0, 1), or a speedup > 1

    @property
    def name(self) -> str:
        """The checkpoint directory: target-20 for a compression of 0.2, speedup-130 for a speedup of 1.3."""
        return target_name(self.value) if self.kind == "compression" else f"speedup-{round(self.value * 100)}"

    @property
    def key(self) -> str:
        """The record field that holds the value (`target` for a compression, as before speed targets)."""
        return "target" if self.kind == "compression" else "target_speedup"

    def record(self) -> dict:
        return {self.key: self.value}

    def __str__(self) -> str:
        return f"target {self.value}" if self.kind == "compression" else f"target speedup {self.value}"


def every_target(targets: list[float], speedups: list[float]) -> list[Target]:
    """Compression targets, then speed targets, each ascending."""
    return [Target("compression", t) for t in sorted(targets)] + [Target("speedup", s) for s in sorted(speedups)]


def validate_targets(targets: list[float], speedups: list[float]) -> None:
    """At least one target, each in range, no two sharing a checkpoint directory."""
    if not targets and not speedups:
        raise MopError("give at least one --target or --target-speedup")
    for target in targets:
        if not 0 < target < 1:
            raise MopError(f"target {target} is outside (0, 1)")
    for speedup in speedups:
        if not 1 < speedup < math.inf:
            raise MopError(f"target speedup {speedup} is not above 1 (a speedup over the dense model)")
    for values, kind in ((targets, "compression"), (speedups, "speedup")):
        names = [Target(kind, v).name for v in set(values)]
        if clash := sorted({name for name in names if names.count(name) > 1}):
            unit = "whole percents" if kind == "compression" else "hundredths"
            raise MopError(f"targets {', '.join(map(str, sorted(set(values))))} share a checkpoint directory "
                           f"({', '.join(clash)}): give targets that differ in {unit}")


def goal_params(target: float, original: int, uncounted: int) -> float:
    """The parameter count at or below which `target` is reached: `uncounted` parameters (0, or the embeddings
    when targets are of the body) are left out of the compression."""
    return uncounted + (1 - target) * (original - uncounted)


def layers_shape(dense: ModelShape, layer: LayerShape, layers: int) -> ModelShape:
    """`dense`'s shape with `layers` layers of `layer`'s widths."""
    return ModelShape(layers=layers, heads=layer.heads, kv_heads=layer.kv_heads, head_dim=layer.head_dim,
                      intermediate=layer.intermediate, hidden=dense.hidden, vocab=dense.vocab)


class Goals:
    """A model's standing against a run's targets: its parameters against a compression's goal (of all
    parameters, or of the body with `compression_of="body"`), its predicted speedup over the dense model (the
    loaded one) against a speed target."""

    def __init__(self, loaded: LoadedModel, compression_of: str, latency: LatencyModel | None):
        self.original_params = count_params(loaded.model)
        self.uncounted = embedding_params(loaded.model) if compression_of == "body" else 0
        self.dense = model_shape(loaded.model, loaded.adapter)
        self.latency = latency

    def goal(self, target: float) -> float:
        """The parameter count at or below which a compression `target` is reached."""
        return goal_params(target, self.original_params, self.uncounted)

    def speedup(self, shape: ModelShape) -> float:
        """The predicted end-to-end speedup of `shape` over the dense model (what `mop bench` measures)."""
        return self.latency.speedup(self.dense, shape)

    def reached(self, target: Target, params: int, shape: ModelShape) -> bool:
        if target.kind == "speedup":
            return self.speedup(shape) >= target.value
        return params <= self.goal(target.value)

    def may_have_reached(self, target: Target, record: dict) -> bool:
        """Whether the model after a logged iteration (its `record` in run.json) reaches `target`; True where the
        record cannot say (a record without the predicted speedup, for a speed target)."""
        if target.kind == "speedup":
            return record.get("predicted_speedup", math.inf) >= target.value
        return record["params"] <= self.goal(target.value)

    def needed(self, target: Target, shape: LayerShape) -> tuple[float, UnitCosts | None]:
        """What a one-shot cut of the dense model (layers of `shape`) must remove to reach `target`: parameters
        (costs None: units cost their parameters), or predicted seconds, units costing their seconds."""
        if target.kind == "compression":
            return math.ceil(self.original_params - self.goal(target.value)), None
        seconds = self.latency.seconds(self.dense)
        unit = self.latency.unit_latency(self.dense)
        return seconds - seconds / target.value, UnitCosts.of_latency(unit, shape, self.dense.layers)

    def shortfall(self, target: Target, params: int, shape: ModelShape) -> str:
        """Where a model that misses `target` stands, in words."""
        if target.kind == "speedup":
            return f"is predicted {self.speedup(shape):.3f}× as fast as the dense model"
        return f"keeps {params} parameters, above the goal of {self.goal(target.value):.0f}"

    def record(self, shape: ModelShape) -> dict:
        """What a checkpoint's records add with a latency model: its predicted speedup."""
        return {} if self.latency is None else {"predicted_speedup": self.speedup(shape)}

    def check_speedups(self, speedups: list[float], smallest: ModelShape, who: str) -> None:
        """Refuse a speed target above the predicted speedup of `smallest`, the smallest model `who` can make."""
        if not speedups:
            return
        most = self.speedup(smallest)
        for speedup in sorted(speedups):
            if speedup > most:
                raise MopError(f"target speedup {speedup} cannot be reached by {who}: at most {most:.3f}× "
                               f"predicted ({smallest.label()})")


def run_latency_model(loaded: LoadedModel, speedups: list[float], record: str | None, out: Path,
                      engine: str = "transformers") -> LatencyModel | None:
    """The latency model that predicts a run's speedups (None without speed targets): the record in the file
    `record` (`--latency-model`), else the one the run in `out` began with (a resume predicts as it did), else
    the loaded model's measured on its device and dtype with `engine` (`measure_latency_model`, cached). Refused
    when it was measured for another model's shape."""
    if not speedups:
        return None
    header = _saved_header(out)
    if record is not None:
        model = _read_record(Path(record))
    elif "latency_model" in header:
        model = LatencyModel.from_record(header["latency_model"])
    else:
        dtype = next(name for name, value in DTYPES.items() if value == loaded.model.dtype)
        model = measure_latency_model(loaded.adapter.text_config(loaded.model), device=str(input_device(loaded.model)),
                                      dtype=dtype, engine=engine, tokenizer=loaded.tokenizer)
    dense, measured_for = model_shape(loaded.model, loaded.adapter), model.context.get("dense_shape")
    if measured_for is not None and ModelShape(**measured_for) != dense:
        raise MopError(f"the latency model was measured for {ModelShape(**measured_for).label()}, not for "
                       f"{loaded.name} ({dense.label()})")
    return model


def _saved_header(out: Path) -> dict:
    """The header of the run in `out` (empty: none, or a corrupt run.json, which `RunState.check` refuses)."""
    try:
        return json.loads((out / RUN_FILE).read_text()).get("header", {})
    except (OSError, ValueError):
        return {}


def _read_record(path: Path) -> LatencyModel:
    try:
        return LatencyModel.from_record(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise MopError(f"--latency-model {path}: not a latency model record ({type(error).__name__}: {error})") \
            from None


def latency_identity(latency: LatencyModel | None) -> dict:
    """What a run's identity adds with a latency model: its digest (a resume must predict with the same one)."""
    return {} if latency is None else {"latency_model": latency.digest()}
