"""Recovery fine-tuning benchmark: seconds per optimizer step and peak memory of `mop finetune` on the embedded
SmolLM2-135M, fp32 vs bf16 on the CPU, and fp32 without activation checkpointing, at the paper's settings
(LoRA r=32 on the seven projections, effective batch 16 in micro-batches of 4, Alpaca rows of at most 512
tokens).

    MOP_DATA_DIR=../shared/data python benchmarks/bench_finetune.py [--only CASE] [--redo]

Each case runs `mop finetune` in a child process for a few optimizer steps; its result is cached in
docs/benchmarks/finetune.json as soon as it finishes (a case is measured again only with --redo or when its
command changed), and docs/benchmarks/finetune.md is rewritten from that file every time. `--model`,
`--steps`, `--max-length` and `--results` exist to check the script on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# case -> dtype and extra options (activation checkpointing is on by default)
CASES = {"fp32": ("float32", []), "bf16": ("bfloat16", []),
         "fp32, no activation checkpointing": ("float32", ["--no-activation-checkpointing"])}


def command(model: str, case: str, steps: int, max_length: int) -> list[str]:
    dtype, extra = CASES[case]
    return [sys.executable, "-m", "mop.cli", "finetune", model, "--dtype", dtype, "--max-steps", str(steps),
            "--batch-size", "16", "--micro-batch-size", "4", "--max-length", str(max_length),
            "--save-every", str(steps), *extra]


def shown(argv: list[str]) -> str:
    """The command as a user types it."""
    return " ".join(["mop", *argv[3:], "--out", "DIR"])


def measure(argv: list[str]) -> dict:
    """Run one fine-tune; its step times (from the record it writes), wall time and peak RSS (via wait4)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out"
        started = time.perf_counter()
        process = subprocess.Popen(argv + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if status != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {process.stderr.read()[-2000:]}")
        record = json.loads((out / "mop.json").read_text())["finetune"]
    steps = record["step_seconds"]
    return {"command": shown(argv), "wall_seconds": round(seconds, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "first_step_seconds": steps[0],
            "seconds_per_step": round(statistics.median(steps[1:] or steps), 3), "step_seconds": steps,
            "losses": [round(loss, 4) for loss in record["losses"]], "rows": record["data"]["rows"]}


def write_report(results: dict, report: Path) -> None:
    lines = ["# Recovery fine-tuning benchmark (CPU)", "",
             f"Machine: {results['machine']}. Produced by `python benchmarks/bench_finetune.py`; raw numbers in "
             f"{report.with_suffix('.json').name}.", "",
             "One optimizer step = 16 Alpaca rows (4 micro-batches of 4, at most "
             f"{results['max_length']} tokens each), LoRA r=32 on q,k,v,o,gate,up,down, AdamW. Seconds per step "
             "are the median over the steps after the first (which also warms up); peak RSS covers the whole "
             "process (interpreter, model load, training).", "",
             "| case | s / step | first step | peak RSS | losses | wall time |", "|---|---|---|---|---|---|"]
    for name in CASES:
        if name in results:
            r = results[name]
            lines.append(f"| {name} | {r['seconds_per_step']:.2f} s | {r['first_step_seconds']:.2f} s | "
                         f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['losses'][0]} → {r['losses'][-1]} | "
                         f"{r['wall_seconds']:.0f} s |")
    if "fp32" in results and "bf16" in results:
        ratio = results["bf16"]["seconds_per_step"] / results["fp32"]["seconds_per_step"]
        memory = results["bf16"]["peak_rss_bytes"] / results["fp32"]["peak_rss_bytes"]
        lines += ["", f"bf16 / fp32: {ratio:.2f}× the time per step, {memory:.2f}× the peak memory. On this CPU the "
                  "bf16 base weights with fp32 LoRA adapters (peft's default) train "
                  + ("slower" if ratio > 1 else "faster") + " than fp32."]
    plain = "fp32, no activation checkpointing"
    if "fp32" in results and plain in results:
        ratio = results["fp32"]["seconds_per_step"] / results[plain]["seconds_per_step"]
        memory = results["fp32"]["peak_rss_bytes"] / results[plain]["peak_rss_bytes"]
        lines += ["", f"Activation checkpointing (the default) / none, fp32: {ratio:.2f}× the time per step, "
                  f"{memory:.2f}× the peak memory."]
    lines += ["", "Commands:", ""] + [f"- {name}: `{results[name]['command']}`" for name in CASES if name in results]
    report.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=list(CASES))
    parser.add_argument("--redo", action="store_true", help="measure again even if a result is cached")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "benchmarks" / "finetune.json")
    args = parser.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                           f"{torch.__version__}, {torch.get_num_threads()} threads", max_length=args.max_length)
    report = args.results.with_suffix(".md")
    for name in [args.only] if args.only else list(CASES):
        argv = command(args.model, name, args.steps, args.max_length)
        cached = results.get(name, {}).get("command") == shown(argv)
        if cached and not args.redo:
            continue
        print(f"measuring {name} ...", flush=True)
        results[name] = measure(argv)
        args.results.write_text(json.dumps(results, indent=1))
        write_report(results, report)
    write_report(results, report)
    print(report.read_text())


if __name__ == "__main__":
    main()
