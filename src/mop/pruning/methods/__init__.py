"""Pruning methods behind one registry. A method takes a loaded model, the run's settings (`SearchConfig`:
targets, seed, calibration data, ...) and an output directory, and writes one plain checkpoint with `mop.json`
per target (`OUT/target-XX/`) plus `OUT/run.json`; run again on the same directory, it resumes or does nothing.

`mop` is the paper's search (in the modes `mop`, `depth`, `width`); the peers are one module each. Register a
new method with the `pruning_method` decorator and name it with `--method`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mop.errors import MopError
from mop.models import LoadedModel
from mop.pruning.methods.llm_pruner import LLMPruner
from mop.pruning.methods.shortgpt import ShortGPT
from mop.pruning.search import Search, SearchConfig
from mop.pruning.state import RunState

PruneFn = Callable[[LoadedModel, SearchConfig, Path], RunState]
PRUNING_METHODS: dict[str, PruneFn] = {}


def pruning_method(name: str):
    def register(fn: PruneFn) -> PruneFn:
        PRUNING_METHODS[name] = fn
        return fn

    return register


@pruning_method("mop")
def mixture_of_pruners(loaded: LoadedModel, config: SearchConfig, out: Path) -> RunState:
    """The MoP search (Algorithm 1) in `config.mode`: the mixture, or its depth-only / width-only extremes."""
    return Search(loaded, config, out).run()


@pruning_method("shortgpt")
def short_gpt(loaded: LoadedModel, config: SearchConfig, out: Path) -> RunState:
    """ShortGPT (Men et al. 2024): one-shot removal of the layers with the lowest block influence."""
    return ShortGPT(loaded, config, out).run()


@pruning_method("llm-pruner")
def llm_pruner(loaded: LoadedModel, config: SearchConfig, out: Path) -> RunState:
    """LLM-Pruner (Ma et al. 2023): KV groups and neurons by first-order Taylor importance, uniform widths."""
    return LLMPruner(loaded, config, out).run()


def prune(loaded: LoadedModel, config: SearchConfig, out: Path) -> RunState:
    if config.method not in PRUNING_METHODS:
        raise MopError(f"unknown pruning method {config.method}; choose one of {', '.join(PRUNING_METHODS)}")
    return PRUNING_METHODS[config.method](loaded, config, out)
