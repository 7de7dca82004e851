"""`mop run`: the paper's whole recipe in one resumable command — per seed, one MoP search to every target, then
recovery fine-tuning, zero-shot evaluation and latency of every checkpoint, then the report.

    OUT/pipeline.json                  the settings (a rerun with other settings is refused)
    OUT/dense/eval.json                the original model's evaluation
    OUT/seed-S/prune/                  the search (run.json, target-XX/ and speedup-XXX/ checkpoints)
    OUT/seed-S/recovered/target-XX/    the recovered checkpoint (plain HF + mop.json)
    OUT/seed-S/{eval,bench}/target-XX.json
    OUT/seed-S/bench/target-XX.vllm.json   the latency and throughput in vLLM (`--bench-vllm`)
    OUT/report.md, OUT/*.png, OUT/results.json

Every stage writes its output atomically and is skipped when that output exists, so an interrupted run carries
on where it stopped; more seeds or targets can be added to a finished run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mop.errors import MopError
from mop.evaluation import PERPLEXITY_TASK, build_task, evaluate, validate_settings, validate_tasks
from mop.latency import LatencySettings, benchmark
from mop.modelcard import add_results, record_measured_speedup
from mop.models import load_model, weights_sha256
from mop.pruning import methods
from mop.pruning.search import SearchConfig
from mop.provenance import write_json_atomic
from mop.latency.vllm_bench import VllmBenchSettings, benchmark_vllm
from mop.serving.vllm_check import find_vllm_python
from mop.training import FinetuneConfig, finetune

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    search: SearchConfig  # its seed is replaced by each of `seeds`
    seeds: list[int] = field(default_factory=lambda: [0])
    recovery: FinetuneConfig | None = field(default_factory=FinetuneConfig)  # None: evaluate the pruned checkpoints
    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande",
                                                      "wikitext"])
    eval_limit: int | None = None  # documents per task (and perplexity segments)
    eval_batch_size: int = 8
    ppl_segment_length: int = 2048
    ppl_segments: int | None = None  # None: eval_limit
    latency: LatencySettings | None = field(default_factory=LatencySettings)  # None: no timing
    vllm_latency: VllmBenchSettings | None = None  # also time in vLLM (its own environment); None: not
    device: str = "cpu"
    dtype: str = "float32"

    def validate(self) -> None:
        self.search.validate()
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise MopError(f"--seeds needs distinct seeds, not {self.seeds}")
        if self.recovery is not None:
            self.recovery.validate()
        validate_tasks(self.tasks)
        validate_settings(self.eval_limit, self.eval_batch_size, self.ppl_segment_length, self.ppl_segments)
        if self.latency is not None:
            self.latency.validate()
        if self.vllm_latency is not None:
            self.vllm_latency.validate()
            python, why = find_vllm_python()
            if python is None:
                raise MopError(f"vLLM not found for the vLLM timing: {why}")

    def identity(self) -> dict:
        """Settings that decide the results; seeds and targets may grow between runs of one directory, and the
        latency stage may be added later (its settings are in every bench record)."""
        settings = asdict(self)
        settings.pop("seeds")
        settings.pop("latency")
        settings.pop("vllm_latency")
        settings["search"] = {k: v for k, v in self.search.identity().items() if k != "seed"}
        if self.recovery is not None:  # its own identity, which leaves defaults of later options out
            settings["recovery"] = {**self.recovery.identity(), "save_every": self.recovery.save_every}
        return settings


def stage(output: Path, compute: Callable[[], dict], what: str) -> dict:
    """The record in `output` if a previous run wrote it, else `compute()` written there atomically."""
    if output.is_file():
        log.info("%s: done already (%s)", what, output)
        return json.loads(output.read_text())
    log.info("%s ...", what)
    record = compute()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, record)
    return record


def claim_directory(out: Path, settings_file: str, identity: dict, what: str, **record: list) -> None:
    """Record `identity` in OUT/`settings_file` with `record` (lists such as targets and seeds, kept as the union
    with the earlier runs' so that a rerun for fewer of them forgets none), or refuse an OUT that holds another
    `what`."""
    settings, identity = out / settings_file, json.loads(json.dumps(identity))
    if settings.is_file():
        saved_settings = json.loads(settings.read_text())
        saved = saved_settings["identity"]
        record = {key: sorted(set(values) | set(saved_settings.get(key, []))) for key, values in record.items()}
        if saved != identity:
            differs = sorted(k for k in saved.keys() | identity.keys() if saved.get(k) != identity.get(k))
            raise MopError(f"{out} holds a {what} with other settings (differs in: {', '.join(differs)}); "
                           "choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise MopError(f"{out} is not empty and holds no mop {what}; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings, {"identity": identity, **record})


def claim(out: Path, config: PipelineConfig, model: str) -> None:
    """Record the model and settings in OUT/pipeline.json, or refuse an OUT that holds something else."""
    claim_directory(out, "pipeline.json", {"model": model, **config.identity()}, "run", seeds=config.seeds,
                    targets=config.search.targets, speedups=config.search.speedups)


def prune(model: str, config: PipelineConfig, seed: int, out: Path) -> dict[str, Path]:
    """One search to every target (skipped when every target's checkpoint exists); target name → checkpoint."""
    checkpoints = {t.name: out / t.name for t in config.search.every_target}
    if not all((path / "mop.json").is_file() for path in checkpoints.values()):
        log.info("seed %d: MoP search to %s", seed, ", ".join(checkpoints))
        loaded = load_model(model, config.device, config.dtype)
        methods.prune(loaded, replace(config.search, seed=seed), out)
    return checkpoints


def check_targets(model: str, runs: dict[Path, PipelineConfig]) -> None:
    """Refuse a target that a method cannot reach on `model` (or a foreign search directory) before a settings
    file or the dense evaluation is written; `runs` maps each run directory to its settings. A run whose
    pipeline.json already lists its targets and seeds passed this check then, so a rerun loads nothing."""
    def claimed(out: Path, config: PipelineConfig) -> bool:
        if not (out / "pipeline.json").is_file():
            return False
        saved = json.loads((out / "pipeline.json").read_text())
        return set(config.search.targets) <= set(saved["targets"]) and set(config.seeds) <= set(saved["seeds"]) \
            and set(config.search.speedups) <= set(saved.get("speedups", []))

    unchecked = {out: config for out, config in runs.items() if not claimed(out, config)}
    if not unchecked:
        return
    first = next(iter(unchecked.values()))
    loaded = load_model(model, first.device, first.dtype)
    for out, config in unchecked.items():
        for seed in config.seeds:
            methods.check(loaded, replace(config.search, seed=seed), out / f"seed-{seed}" / "prune")


def check_tasks(config: PipelineConfig) -> None:
    """A task whose documents cannot be read fails now, not after hours of pruning."""
    for task in config.tasks:
        if task != PERPLEXITY_TASK:
            build_task(task)


def run_pipeline(model: str, config: PipelineConfig, out: Path, dense: Path | None = None,
                 report: bool = True) -> dict | None:
    """Prune → recover → evaluate → time, for every seed and target; returns the report's results.

    `dense` is where the dense model's evaluation is kept (default `OUT/dense/eval.json`; `mop compare` shares
    one between methods); `report=False` leaves the report to the caller."""
    from mop.report import write_report

    config.validate()
    check_tasks(config)
    if dense is None:  # `mop compare` checks every method before its own files
        check_targets(model, {out: config})
    claim(out, config, model)

    def evaluated(checkpoint: str) -> dict:
        return evaluate(load_model(checkpoint, config.device, config.dtype), config.tasks, config.eval_limit,
                        config.eval_batch_size, config.ppl_segment_length, ppl_segments=config.ppl_segments)

    def timed(checkpoint: str) -> dict:
        candidate = load_model(checkpoint, config.device, config.dtype)
        return benchmark(candidate, load_model(model, config.device, config.dtype), config.latency)

    def timed_in_vllm(checkpoint: str) -> dict:
        return benchmark_vllm(checkpoint, model, config.vllm_latency)

    stage(dense or out / "dense" / "eval.json", lambda: evaluated(model), f"evaluate {model}")
    for seed in config.seeds:
        seed_dir = out / f"seed-{seed}"
        evaluation = lambda name: seed_dir / "eval" / f"{name}.json"
        timing = lambda name: seed_dir / "bench" / f"{name}.json"
        vllm_timing = lambda name: seed_dir / "bench" / f"{name}.vllm.json"
        pending = [name for name in (t.name for t in config.search.every_target)
                   if not evaluation(name).is_file() or config.latency and not timing(name).is_file()
                   or config.vllm_latency and not vllm_timing(name).is_file()]
        if not pending:  # every result of this seed is in (its checkpoints may be gone: a fresh machine)
            continue
        checkpoints = prune(model, config, seed, seed_dir / "prune")
        for name in pending:
            final = checkpoints[name]
            recovered = seed_dir / "recovered" / name
            if config.recovery is not None and not evaluation(name).is_file() and not (recovered / "mop.json").is_file():
                log.info("seed %d, %s: recovery fine-tuning", seed, name)
                finetune(str(final), recovered, replace(config.recovery, seed=seed), config.device, config.dtype)
            if config.recovery is not None and (recovered / "mop.json").is_file():
                final = recovered
            measured = stage(evaluation(name), lambda: evaluated(str(final)), f"seed {seed}, {name}: evaluate")
            latency = None
            if config.latency is not None:  # latency depends on the shapes only: the pruned checkpoint has the
                # recovered one's, and is timed when the recovered one is gone
                latency = stage(timing(name), lambda: timed(str(final)), f"seed {seed}, {name}: latency")
            add_results(final, weights_sha256(final), measured, latency)  # those measured on `final`'s weights
            if config.vllm_latency is not None:
                served = stage(vllm_timing(name), lambda: timed_in_vllm(str(final)),
                               f"seed {seed}, {name}: latency in vLLM")
                record_measured_speedup(final, served)
    return write_report(out, model, config, dense) if report else None
