"""What the peer methods share: a one-shot run. Importance scores are computed once, on the original model, and
kept in `OUT/run.json`; each target's checkpoint is then cut from a structural copy of the original by a plan
that depends on those scores and the target only. A rerun of a finished run writes nothing; an interrupted or
extended run (a target added) reads the scores back instead of recomputing them, so its checkpoints are
bitwise those of an uninterrupted run. An `--out` holding another run is refused untouched (`RunState.check`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

import torch.nn as nn

from mop.latency.model import ModelShape, model_shape
from mop.models import LoadedModel, count_params, embedding_params, save_checkpoint
from mop.errors import MopError
from mop.provenance import command, versions
from mop.data import Batch
from mop.pruning.compensation import compensation_record, cut
from mop.pruning.search import SearchConfig, calibration_batches
from mop.pruning.state import RunState
from mop.pruning.surgery import structural_copy
from mop.pruning.targets import Goals, Target, latency_identity, run_latency_model


class OneShotPruner(ABC):
    """One peer run of `config.method` on `loaded` into `out`.

    A subclass says which settings decide its result (`settings`), how far it can prune (`most_compression`,
    `smallest_shape`), how it scores the original model (`score`, JSON-able) and how it cuts a copy of it to a
    target (`cut`).
    """

    def __init__(self, loaded: LoadedModel, config: SearchConfig, out: Path):
        config.validate()
        self.loaded, self.config, self.out = loaded, config, out
        self.original_params = count_params(loaded.model)
        self.original_embedding_params = embedding_params(loaded.model)
        config.alignment.check(loaded.adapter.shape(loaded.model), loaded.name)
        # None: no speed target
        self.latency = run_latency_model(loaded, config.speedups, config.latency_model, out, config.latency_engine)
        self.goals = Goals(loaded, config.compression_of, self.latency)
        most = self.most_compression()
        if config.compression_of == "body":  # the same parameters removed, as a share of the body
            most *= self.original_params / (self.original_params - self.original_embedding_params)
        for target in config.targets:
            if target > most:
                raise MopError(f"target {target} cannot be reached by {config.method}: at most {most:.3f}")
        if self.latency is not None:
            self.goals.check_speedups(config.speedups, self.smallest_shape(), config.method)
        compensation = {k: v for k, v in config.identity().items() if k.startswith("compensation")}  # if asked
        self.identity = {"model_sha256": loaded.weights_sha256, "dtype": str(loaded.model.dtype),
                         "method": config.method, "seed": config.seed, "compression_of": config.compression_of,
                         **self.settings(), **compensation, **latency_identity(self.latency)}
        self.saved = RunState.check(out, self.identity)  # before any long work

    @abstractmethod
    def settings(self) -> dict:
        """The `SearchConfig` fields this method reads (they and the model decide the result)."""

    @abstractmethod
    def most_compression(self) -> float:
        """The highest compression (of all parameters) the method can reach on this model."""

    @abstractmethod
    def smallest_shape(self) -> ModelShape:
        """The shape of the smallest model the method can make (the highest speedup it can reach)."""

    @abstractmethod
    def score(self) -> dict:
        """Importance scores of the original model, JSON-able (floats round-trip exactly through run.json)."""

    @abstractmethod
    def cut(self, model: nn.Module, scores: dict, target: Target, state: RunState) -> list[dict]:
        """Prune `model`, a structural copy of the original, to `target`; append to `state.iterations` the
        records this target needs that the log lacks, and return the records that lead to this model."""

    @cached_property
    def calibration(self) -> list[Batch]:
        """The run's calibration batches (read once, when first needed)."""
        return calibration_batches(self.loaded, self.config)

    def cut_units(self, model: nn.Module, width: dict | None = None, layer: int | None = None, count: int = 1) -> None:
        """Cut `width` units, or the `count` decoder layers from `layer` on, from `model`, repaired first when
        the run compensates (`mop.pruning.compensation`); the repair's records go to `self.repairs`, which the
        target's mop.json lists."""
        settings = self.config.compensation_settings
        records = cut(model, self.loaded.adapter, self.calibration if settings.enabled else [], settings, width,
                      layer, count)
        self.repairs.extend(records or [])

    def shape(self, model: nn.Module) -> ModelShape:
        return model_shape(model, self.loaded.adapter)

    def run(self) -> RunState:
        pending = [t for t in self.config.every_target
                   if not (self.saved and t.name in self.saved["targets"] and (self.out / t.name / "mop.json").is_file())]
        if self.saved and not pending:  # finished: nothing is written, run.json included
            saved = self.saved
            return RunState(self.out, self.identity, saved["header"], saved["iterations"], saved["targets"])
        if self.saved:
            header = self.saved["header"]
        else:
            started = time.perf_counter()
            scores = self.score()
            header = {"source": {"name": self.loaded.name, "sha256": self.loaded.weights_sha256,
                                 "architecture": type(self.loaded.model).__name__},
                      "original_params": self.original_params,
                      "original_embedding_params": self.original_embedding_params, "versions": versions(),
                      "scoring_seconds": round(time.perf_counter() - started, 3), "scores": scores,
                      **({} if self.latency is None else {"latency_model": self.latency.record()})}
        state = RunState.open(self.out, self.identity, header)
        state.save()  # the scores first: a checkpoint never sits in OUT without the run.json that explains it
        for target in pending:
            model = structural_copy(self.loaded.model)  # shares every tensor; pruning builds new ones
            self.repairs: list[dict] = []
            records = self.cut(model, header["scores"], target, state)
            params, shape = count_params(model), self.shape(model)
            if not self.goals.reached(target, params, shape):  # every method reaches its targets, or says it cannot
                raise MopError(f"{self.config.method} cannot reach {target} on {self.loaded.name}: its cut "
                               f"{self.goals.shortfall(target, params, shape)}; choose another target or alignment")
            save_checkpoint(self.loaded, model, self.out / target.name, self.provenance(state, model, target, records))
            state.targets[target.name] = {**target.record(), "iteration": records[-1]["iteration"] if records else 0,
                                          "params": params, "compression": 1 - params / self.original_params,
                                          **self.goals.record(shape)}
            state.save()
        return state

    def provenance(self, state: RunState, model: nn.Module, target: Target, records: list[dict]) -> dict:
        """mop.json: the run's header (without the scores), the method and its settings, the sizes reached and
        the records that lead to this checkpoint (without the removed indices, which run.json holds)."""
        params, embedded = count_params(model), self.original_embedding_params
        records = [{k: v for k, v in r.items() if k != "removed"} for r in records]
        return {
            **{k: v for k, v in state.header.items() if k != "scores"},
            # the libraries of the session that writes this checkpoint, beside those of the one that scored
            "versions": versions(), "run_versions": state.header["versions"],
            "method": self.config.method, **target.record(), "compression_of": self.config.compression_of,
            "settings": self.settings(), "seed": self.config.seed,
            "path": "".join(r["choice"] for r in records), "params": params,
            "compression": 1 - params / self.original_params,
            "non_embedding_compression": 1 - (params - embedded) / (self.original_params - embedded),
            **self.goals.record(self.shape(model)), "iterations": records, "command": command(),
            **compensation_record(self.config.compensation_settings, self.repairs),
        }
