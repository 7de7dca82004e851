"""The equal-speed study of issue 28 on SmolLM2-135M, no recovery: every method stopped at the same predicted
speedups (`--target-speedup 1.25 1.4 1.6`) by one latency model of this CPU, then WikiText-2 perplexity by the
standard protocol on the first 8 and 32 segments, and on request the measured speedup (`--bench`), the four
tasks (`--tasks N`: the first N documents of each) and the perplexity after the quality study's recovery
(`--recover study32 [--speeds S ...]`). `--engine vllm` runs the same cells (labels ending `-vllm`) for serving
in vLLM: pruned by a latency model timed in vLLM, and timed by `mop bench --engine vllm`.

Every method runs with the small recipe's pruning settings (block influence for the search's layers, the
closed-form repair, WikiText-2 validation text) on the README job's 32 calibration prompts, so the rows differ
by the method only; the cells ending `-p64` calibrate instead on 64 packed windows of 512 tokens at the
library's ridges (`PACKED`), the recommended configuration. The latency model is one record per engine,
`docs/study/speed/latency_model.json` (`latency_model_vllm.json`), taken from this machine's cache
(`mop.latency.measure_latency_model`, measured when absent) the first time and shared by every cell, so all of
them stop by the same prediction.

A cell is one method and seed pruned in-process to the three speeds (`--speeds`: a first pass at fewer, which a
later pass resumes); its result is `docs/study/speed/<label>.json` (the settings, the equivalent `mop prune`
command, per speed the predicted and measured speedups, size, path, perplexities, accuracies). A rerun computes
only what is missing: the cells without a record or a speed, then the timings and tasks the records lack.
Checkpoints go to `runs/speed/` (never committed); where a record's are gone, a pass that needs them (more
speeds, timings, tasks, recovery) prunes them again and checks them against the record's perplexity.

    MOP_DATA_DIR=../shared/data python benchmarks/study_speed.py [--engine vllm] [--only LABEL ...]
        [--speeds S ...] [--bench] [--tasks N] [--recover study32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from study_compensation import RECOVERIES, recover  # this folder's runner of the compensation study

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "study" / "speed"
RUNS = ROOT / "runs" / "speed"
# engine → the latency model's record and the suffix of its cells' labels
LATENCY_MODELS = {"transformers": DOCS / "latency_model.json", "vllm": DOCS / "latency_model_vllm.json"}
SUFFIXES = {"transformers": "", "vllm": "-vllm"}
MODEL = "smollm2-135m"
SPEEDUPS = (1.25, 1.4, 1.6)
SEGMENTS = (8, 32)
TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")
# the small recipe's pruning settings (mop.recipes) on the README job's 32 prompts, with the ridges of the time
# (one of 1e-2 for both kinds of repair; the defaults since are benchmarks/ablation_repair.py's)
SHARED = {"compensation": "lstsq", "calib": "wikitext2-valid", "calib_samples": 32, "compensation_ridge": 1e-2,
          "compensation_depth_ridge": 1e-2}
# the recommended calibration (RESULTS.md, compensation): 64 packed windows of 512 tokens of the validation text,
# the library's ridges (width 1e-1, depth 1e-4); cells "-p64", which differ from the others by these only
PACKED = {"calib_samples": 64, "calib_packed": True, "compensation_ridge": 1e-1, "compensation_depth_ridge": 1e-4}
CELLS = {
    "width": {"mode": "width"},
    "shortgpt": {"method": "shortgpt"},
    "llm-pruner": {"method": "llm-pruner"},
    **{f"mop-bi-s{seed}": {"layer_criterion": "block_influence", "seed": seed} for seed in (0, 1, 2)},
    # the search with the layer criterion that ranks layers by what the depth repair leaves
    **{f"mop-re-s{seed}": {"layer_criterion": "repair_error", "seed": seed} for seed in (0, 1, 2)},
    "width-p64": {"mode": "width", **PACKED},
    "shortgpt-p64": {"method": "shortgpt", **PACKED},
    "llm-pruner-p64": {"method": "llm-pruner", **PACKED},
    **{f"mop-bi-s{seed}-p64": {"layer_criterion": "block_influence", "seed": seed, **PACKED} for seed in (0, 1, 2)},
}
BENCH = {"runs": 5, "warmup": 1}  # the protocol's runs per checkpoint, alternating with the dense model


def command(fields: dict, engine: str, speedups: tuple[float, ...] = SPEEDUPS) -> str:
    options = {"method": "--method", "mode": "--mode", "layer_criterion": "--layer-criterion", "seed": "--seed",
               "compensation": "--compensation", "calib": "--calib", "calib_samples": "--calib-samples",
               "compensation_ridge": "--compensation-ridge", "compensation_depth_ridge": "--compensation-depth-ridge",
               "calib_packed": "--calib-packed"}
    return (f"mop prune {MODEL} " + " ".join(f"--target-speedup {s}" for s in speedups) + " "
            + " ".join(options[k] if v is True else f"{options[k]} {v}" for k, v in fields.items())
            + f" --latency-model {LATENCY_MODELS[engine].relative_to(ROOT)} --out DIR")


def speed_name(speedup: float) -> str:
    return f"speedup-{round(100 * speedup)}"


def latency_model_file(engine: str) -> Path:
    """The study's one latency model of `engine`: this machine's (cached or measured), written once."""
    path = LATENCY_MODELS[engine]
    if not path.exists():
        from mop.latency import measure_latency_model
        from mop.models import load_model
        from mop.provenance import write_json_atomic

        loaded = load_model(MODEL)
        model = measure_latency_model(loaded.adapter.text_config(loaded.model), engine=engine,
                                      tokenizer=loaded.tokenizer)
        DOCS.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, model.record())
    return path


def prune_cell(label: str, fields: dict, engine: str, speedups: tuple[float, ...], result: dict) -> dict:
    """Prune one cell to `speedups` (resuming its search where an earlier pass stopped) and measure the perplexity
    of each checkpoint that `result` (its record so far) lacks."""
    from mop import data
    from mop.models import load_model
    from mop.pruning import methods
    from mop.pruning.search import SearchConfig

    settings = {**SHARED, **fields}
    started = time.perf_counter()
    loaded = load_model(MODEL)
    out = RUNS / label
    speedups = tuple(sorted({*speedups, *(s for s in SPEEDUPS if speed_name(s) in result.get("speeds", {}))}))
    methods.prune(loaded, SearchConfig(targets=[], speedups=list(speedups),
                                       latency_model=str(latency_model_file(engine)), **settings), out)
    segments = data.text_segments(loaded.tokenizer, data.perplexity_text("wikitext2"), 2048, max(SEGMENTS))
    result = {"label": label, "engine": engine, "settings": settings, "command": command(settings, engine, speedups),
              "prune_seconds": round(result.get("prune_seconds", 0) + time.perf_counter() - started, 1),
              "speeds": result.get("speeds", {})}
    for speedup in speedups:
        name = speed_name(speedup)
        if name in result["speeds"]:
            continue
        record = json.loads((out / name / "mop.json").read_text())
        model = load_model(str(out / name)).model
        result["speeds"][name] = {
            "predicted_speedup": record["predicted_speedup"], "params": record["params"],
            "compression": record["compression"], "path": record["path"],
            **perplexities(model, segments),
        }
    return result


def rebuild_cell(label: str, fields: dict, engine: str, result: dict, speedups: list[float]) -> None:
    """Prune again the checkpoints at `speedups` of a cell whose record holds them but whose runs/speed folder is
    gone (another machine, a cleaned checkout): the search is deterministic, so the same settings give the same
    models. Each must reproduce its record's perplexities (to 0.1%), or the cell stops here."""
    rebuilt = prune_cell(label, fields, engine, tuple(speedups), {"speeds": {}})
    for name, measured in rebuilt["speeds"].items():
        for key in (f"ppl{n}" for n in SEGMENTS):
            recorded = result["speeds"][name][key]
            if abs(measured[key] - recorded) > 1e-3 * recorded:
                raise SystemExit(f"{label}: {name} pruned again has {key} {measured[key]:.2f}, its record "
                                 f"{recorded:.2f}; remove runs/speed/{label} and its record to prune it afresh")
        print(f"{label}: {name} pruned again, perplexity {measured['ppl8']:.2f} / {measured['ppl32']:.2f} as "
              "recorded", flush=True)


def perplexities(model, segments: list) -> dict[str, float]:
    """WikiText-2 perplexity on the first n segments for each n in SEGMENTS, every segment scored once (they are
    all 2048 tokens long, so the perplexity of n segments is the geometric mean of theirs)."""
    from mop.evaluation.perplexity import segments_perplexity

    with torch.inference_mode():
        logs = [math.log(segments_perplexity(model, [segment])) for segment in segments[:max(SEGMENTS)]]
    return {f"ppl{n}": math.exp(sum(logs[:n]) / n) for n in SEGMENTS}


def bench_cell(result: dict) -> None:
    """Time each checkpoint of `result` against the dense model by the paper's protocol (measured speedup), in the
    cell's engine (vLLM: `mop bench --engine vllm`, its throughput at the smallest setting it takes)."""
    from mop.latency import LatencySettings, benchmark
    from mop.latency.vllm_bench import VllmBenchSettings, benchmark_vllm
    from mop.models import load_model

    dense = load_model(MODEL)
    settings = LatencySettings(**BENCH, time_generate=False)
    for name, measured in result["speeds"].items():
        if "measured_speedup" in measured:
            continue
        checkpoint = str(RUNS / result["label"] / name)
        if result.get("engine", "transformers") == "vllm":
            record = benchmark_vllm(checkpoint, MODEL, VllmBenchSettings(settings, batch=1, batch_runs=3))
        else:
            record = benchmark(load_model(checkpoint), dense, settings)
        measured |= {"measured_speedup": record["speedup"]["ratio_of_means"],
                     "measured_speedup_std": record["speedup"]["std"], "bench": BENCH,
                     "load_average": os.getloadavg()[0]}
        save(result)


def task_cell(result: dict, limit: int) -> None:
    """The four tasks on the first `limit` documents of each, for each checkpoint of `result` that lacks them."""
    from mop.evaluation.harness import accuracy, paper_average
    from mop.models import load_model

    for name, measured in result["speeds"].items():
        if measured.get("tasks_limit") == limit:
            continue
        tasks = accuracy(load_model(str(RUNS / result["label"] / name)), list(TASKS), limit, batch_size=8)
        measured |= {"tasks": tasks, "average": paper_average(tasks)[0], "tasks_limit": limit}
        save(result)


def recover_cell(result: dict, recovery: str, speedups: list[float]) -> None:
    """Recover each checkpoint of `result` at `speedups` by RECOVERIES[recovery] (study_compensation) and measure
    its perplexity."""
    from mop import data
    from mop.models import load_model

    segments = data.text_segments(load_model(MODEL).tokenizer, data.perplexity_text("wikitext2"), 2048, max(SEGMENTS))
    for speedup in speedups:
        measured = result["speeds"][speed_name(speedup)]
        if recovery in measured.get("recovered", {}):
            continue
        checkpoint = RUNS / result["label"] / speed_name(speedup)
        measured.setdefault("recovered", {})[recovery] = recover(checkpoint, recovery, "cpu", segments)
        save(result)


def write_report() -> None:
    """docs/study/speed/README.md: per speed, every cell's row from the records."""
    from mop.evaluation.tasks import PAPER_METRIC

    paths = [DOCS / f"{label}{suffix}.json" for suffix in SUFFIXES.values() for label in CELLS]
    records = [json.loads(path.read_text()) for path in paths if path.exists()]
    lines = ["# Equal-speed study (SmolLM2-135M, CPU, no recovery)", "",
             "Written by `benchmarks/study_speed.py` from the records beside this file (each with its `mop prune` "
             "command); the protocol is in its docstring and in docs/RESULTS.md.", ""]
    for speedup in SPEEDUPS:
        name = speed_name(speedup)
        lines += [f"## {speedup}x", "", "| cell | path | compression | predicted speedup | measured speedup | "
                  "WikiText-2 (8 / 32 segments) | ARC-e | HellaSwag | PIQA | WinoGrande | average | "
                  "WikiText-2 after the study's recovery (8 / 32) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for record in (r for r in records if name in r["speeds"]):
            row = record["speeds"][name]
            measured = (f"{row['measured_speedup']:.3f} ± {row['measured_speedup_std']:.3f}"
                        if "measured_speedup" in row else "—")
            tasks = row.get("tasks", {})
            accuracy = [f"{100 * tasks[t][PAPER_METRIC.get(t, 'acc_norm')]:.1f}" if t in tasks else "—"
                        for t in TASKS]
            average = f"{100 * row['average']:.1f}" if row.get("average") is not None else "—"
            recovered = row.get("recovered", {}).get("study32")
            recovered = f"{recovered['ppl8']:.2f} / {recovered['ppl32']:.2f}" if recovered else "—"
            lines.append(f"| {record['label']} | `{row['path']}` | {100 * row['compression']:.1f}% | "
                         f"{row['predicted_speedup']:.3f} | {measured} | {row['ppl8']:.2f} / {row['ppl32']:.2f} | "
                         + " | ".join(accuracy) + f" | {average} | {recovered} |")
        lines.append("")
    (DOCS / "README.md").write_text("\n".join(lines))


def save(result: dict) -> None:
    path = DOCS / f"{result['label']}.json"
    path.with_suffix(".partial").write_text(json.dumps(result, indent=1))
    os.replace(path.with_suffix(".partial"), path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=sorted(LATENCY_MODELS), default="transformers",
                        help="what the cells' speeds are predicted and timed in")
    parser.add_argument("--only", action="append", default=[], help="a cell's label (repeatable)")
    parser.add_argument("--bench", action="store_true", help="also time every checkpoint (needs a quiet machine)")
    parser.add_argument("--tasks", type=int, metavar="N", help="also the four tasks on their first N documents")
    parser.add_argument("--recover", choices=sorted(RECOVERIES), help="also recover the checkpoints and measure them")
    parser.add_argument("--speeds", type=float, nargs="+", default=list(SPEEDUPS),
                        help="the speeds this pass prunes to (a later pass at more resumes each search) and recovers")
    args = parser.parse_args()
    DOCS.mkdir(parents=True, exist_ok=True)
    for label, fields in CELLS.items():
        label += SUFFIXES[args.engine]
        if args.only and label not in args.only:
            continue
        path = DOCS / f"{label}.json"
        result = json.loads(path.read_text()) if path.exists() else {"speeds": {}}
        prune_more = any(speed_name(s) not in result["speeds"] for s in args.speeds)
        if result["speeds"] and not (RUNS / label).is_dir() and (prune_more or args.bench or args.tasks
                                                                 or args.recover):
            recorded = [s for s in SPEEDUPS if speed_name(s) in result["speeds"]]
            rebuild_cell(label, fields, args.engine, result,
                         recorded if prune_more else [s for s in args.speeds if s in recorded])
        if prune_more:
            result = prune_cell(label, fields, args.engine, tuple(args.speeds), result)
            save(result)
        print(label, " ".join(f"{n}: {v['predicted_speedup']:.3f}x {v['ppl8']:.2f}" for n, v in
                              result["speeds"].items()), flush=True)
        if args.bench:
            bench_cell(result)
        if args.tasks:
            task_cell(result, args.tasks)
        if args.recover:
            recover_cell(result, args.recover, args.speeds)
    write_report()


if __name__ == "__main__":
    main()
