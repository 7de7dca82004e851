"""Pruning methods behind one registry. A method takes a loaded model, the run's settings (`SearchConfig`:
targets, seed, calibration data, ...) and an output directory, and writes one plain checkpoint with `mop.json`
per target (`OUT/target-XX/`, or `OUT/speedup-XXX/` for a speed target) plus `OUT/run.json`; run again on the
same directory, it resumes or does nothing.

`mop` is the paper's search (in the modes `mop`, `depth`, `width`); the peers are one module each. Register a
new method with the `pruning_method` decorator and name it with `--method`; give it a `check` (raise `MopError`,
do no work) so that `mop run` and `mop compare` refuse an unreachable target before they write anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mop.errors import MopError
from mop.models import LoadedModel
from mop.pruning.methods.llm_pruner import LLMPruner
from mop.pruning.methods.shortgpt import ShortGPT
from mop.pruning.search import Search, SearchConfig, check_reachable
from mop.pruning.state import RunState
from mop.pruning.targets import run_latency_model

PruneFn = Callable[[LoadedModel, SearchConfig, Path], RunState]
CheckFn = Callable[[LoadedModel, SearchConfig, Path], None]  # raises MopError for a target or OUT it cannot take
PRUNING_METHODS: dict[str, PruneFn] = {}
PRUNING_CHECKS: dict[str, CheckFn] = {}


def pruning_method(name: str, check: CheckFn | None = None):
    def register(fn: PruneFn) -> PruneFn:
        PRUNING_METHODS[name] = fn
        if check is not None:
            PRUNING_CHECKS[name] = check
        return fn

    return register


def _check_search(loaded: LoadedModel, config: SearchConfig, out: Path) -> None:
    latency = run_latency_model(loaded, config.speedups, config.latency_model, out, config.latency_engine)
    check_reachable(loaded, config, latency)


@pruning_method("mop", check=_check_search)
def mixture_of_pruners(loaded: LoadedModel, config: SearchConfig, out: Path) -> RunState:
    """The MoP search (Algorithm 1) in `config.mode`: the mixture, or its depth-only / width-only extremes."""
    return Search(loaded, config, out).run()


@pruning_method("shortgpt", check=ShortGPT)  # the constructor checks, the run works
def short_gpt(loaded: LoadedModel, config: SearchConfig, out: Path) -> RunState:
    """ShortGPT (Men et al. 2024): one-shot removal of the layers with the lowest block influence."""
    return ShortGPT(loaded, config, out).run()


@pruning_method("llm-pruner", check=LLMPruner)
def llm_pruner(loaded: LoadedModel, config: SearchConfig, out: Path) -> RunState:
    """LLM-Pruner (Ma et al. 2023): KV groups and neurons by first-order Taylor importance, uniform widths."""
    return LLMPruner(loaded, config, out).run()


def known(method: str) -> None:
    if method not in PRUNING_METHODS:
        raise MopError(f"unknown pruning method {method}; choose one of {', '.join(PRUNING_METHODS)}")


def check(loaded: LoadedModel, config: SearchConfig, out: Path) -> None:
    """Refuse, without doing any work, what `config.method` would refuse on this model and OUT (when it says)."""
    known(config.method)
    if config.method in PRUNING_CHECKS:
        PRUNING_CHECKS[config.method](loaded, config, out)


def prune(loaded: LoadedModel, config: SearchConfig, out: Path) -> RunState:
    known(config.method)
    return PRUNING_METHODS[config.method](loaded, config, out)
