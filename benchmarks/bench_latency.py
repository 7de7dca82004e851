"""Latency benchmark (issue 3): speedup of the SmolLM2-135M MoP checkpoints at 20%, 30% and 40% compression over
the dense model, on CPU in float32 and bfloat16, under the paper's protocol (`mop.latency.protocol`: batch 1, 12-token
prompt, 128 greedy tokens, 20 alternating runs per model, the first 10 discarded).

    MOP_DATA_DIR=../shared/data python benchmarks/bench_latency.py [--only float32/target-30] [--redo] [--dry]

The checkpoints come from one `mop prune` run (the paper's default random path, seed 0) in runs/bench-latency/
(git-ignored; the run resumes if interrupted). Each case's record is cached in docs/benchmarks/latency.json as soon
as it finishes, so an interrupted benchmark carries on where it stopped; docs/benchmarks/latency.md is rewritten
from that file every time. `--dry` checks the script with a tiny protocol (3 runs, 1 warmup, 8 tokens) and writes
to runs/bench-latency/dry/ instead, leaving the real results alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mop.latency import LatencySettings, benchmark
from mop.models import LoadedModel, load_model
from mop.pruning.search import target_name
from mop.provenance import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-latency"
PRUNE_DIR = WORK / "prune"
GOALS = {0.2: 1.2, 0.3: 1.33, 0.4: 1.55}  # target compression -> speedup goal
DTYPES = ("float32", "bfloat16")
PRUNE = ["mop", "prune", "smollm2-135m", "--target", "0.2", "--target", "0.3", "--target", "0.4", "--seed", "0"]
COMMAND = "MOP_DATA_DIR=../shared/data python benchmarks/bench_latency.py"


def checkpoint(target: float) -> Path:
    return PRUNE_DIR / target_name(target)


def case_name(dtype: str, target: float) -> str:
    return f"{dtype}/{target_name(target)}"


def prune_once() -> None:
    if all((checkpoint(target) / "mop.json").is_file() for target in GOALS):
        return
    print(f"pruning: {' '.join(PRUNE)} --out {PRUNE_DIR}", flush=True)
    subprocess.run([sys.executable, "-m", "mop.cli", *PRUNE[1:], "--out", str(PRUNE_DIR)], check=True)


def measure_case(dense: LoadedModel, target: float, dtype: str, settings: LatencySettings) -> dict:
    """The latency record of the checkpoint at `target` against `dense`, with the checkpoint's compression and path."""
    pruned = load_model(str(checkpoint(target)), "cpu", dtype)
    provenance = json.loads((checkpoint(target) / "mop.json").read_text())
    record = benchmark(pruned, dense, settings)
    record["checkpoint"] = {"target": target, "compression": provenance["compression"], "path": provenance["path"]}
    return record


def report_row(record: dict) -> str:
    dense, pruned = record["models"]["baseline"], record["models"]["candidate"]
    target, speedup = record["checkpoint"]["target"], record["speedup"]
    goal = GOALS[target]
    cells = [
        f"{target:.0%}", f"{record['checkpoint']['compression']:.2%}", f"`{record['checkpoint']['path']}`",
        f"{pruned['params']:,}",
        f"{dense['end_to_end_s']['mean']:.3f} / {pruned['end_to_end_s']['mean']:.3f}",
        f"{dense['decode_ms_per_token']['mean']:.2f} / {pruned['decode_ms_per_token']['mean']:.2f}",
        f"{dense['prefill_tokens_per_s']['mean']:,.0f} / {pruned['prefill_tokens_per_s']['mean']:,.0f}",
        f"{speedup['mean']:.3f} ± {speedup['std']:.3f}", f"{speedup['ratio_of_means']:.3f}",
        f"{1 / (1 - record['checkpoint']['compression']):.2f}", f"{goal}", "yes" if speedup["mean"] >= goal else "no",
    ]
    return "| " + " | ".join(cells) + " |"


def write_report(results: dict, path: Path) -> None:
    if not results:
        return
    first = next(iter(results.values()))
    settings = first["settings"]
    lines = [
        "# Latency of the SmolLM2-135M MoP checkpoints (CPU)", "",
        f"Machine: {first['device']}, {first['torch_threads']} torch threads, torch {first['versions']['torch']}, "
        f"transformers {first['versions']['transformers']}. Produced by `{COMMAND}`; full records (every run) "
        f"in {path.with_suffix('.json').name}.",
        f"Checkpoints: `{' '.join(PRUNE)} --out DIR` (the paper's default random path).", "",
        f"Protocol (SPEC §4): batch 1, a {settings['prompt_tokens']}-token prompt, exactly {settings['new_tokens']} "
        f"greedy tokens with the KV cache, {settings['runs']} runs per model with dense and pruned alternating "
        f"(order reversed every other run), the first {settings['warmup']} of each discarded; mean over the kept "
        f"runs. Speedup = dense / pruned end-to-end time per run, mean ± sample std (and the ratio of the mean "
        f"times); met = mean speedup ≥ goal. Prefill throughput: one {settings['prefill_tokens']}-token forward "
        f"pass. Ideal = 1/(1 − compression), the bound of a memory-bound decode.",
    ]
    header = ("| target | compression | path | pruned params | e2e s dense / pruned | decode ms/token dense / pruned "
              "| prefill tok/s dense / pruned | speedup ± std | ratio of means | ideal | goal | met? |")
    for dtype in DTYPES:
        rows = [report_row(r) for name, r in results.items() if name.startswith(dtype + "/")]
        if rows:
            lines += ["", f"## {dtype}", "", header, "|" + "---|" * (header.count("|") - 1), *rows]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=[case_name(dtype, target) for dtype in DTYPES for target in GOALS])
    parser.add_argument("--redo", action="store_true", help="measure again even if a result is cached")
    parser.add_argument("--dry", action="store_true", help="tiny protocol, results in runs/bench-latency/dry/")
    args = parser.parse_args()

    if args.dry:
        settings = LatencySettings(runs=3, warmup=1, new_tokens=8, prefill_tokens=64)
        results_file = WORK / "dry" / "latency.json"
    else:
        settings = LatencySettings()
        results_file = ROOT / "docs" / "benchmarks" / "latency.json"
    report = results_file.with_suffix(".md")
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    prune_once()
    cases = [args.only] if args.only else [case_name(dtype, target) for dtype in DTYPES for target in GOALS]
    for dtype in DTYPES:
        todo = [t for t in GOALS if case_name(dtype, t) in cases and (args.redo or case_name(dtype, t) not in results)]
        if not todo:
            continue
        dense = load_model("smollm2-135m", "cpu", dtype)
        for target in todo:
            name = case_name(dtype, target)
            print(f"measuring {name} ...", flush=True)
            results[name] = measure_case(dense, target, dtype, settings)
            write_json_atomic(results_file, results)
            write_report(results, report)
    write_report(results, report)
    print(report.read_text())


if __name__ == "__main__":
    main()
