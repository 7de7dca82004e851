"""Pruning benchmarks on the embedded SmolLM2-135M (issue 2): wall time and peak memory of `mop prune`
(random and kl path criteria, the random path with `--compensation lstsq` too), and AMP scoring throughput
relative to a plain forward pass.

    MOP_DATA_DIR=../shared/data python benchmarks/bench_prune.py [--only NAME ...] [--redo]

Each case's result is cached in docs/benchmarks/prune.json as soon as it finishes, so an interrupted run
carries on where it stopped; docs/benchmarks/prune.md is rewritten from that file every time.
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
RESULTS = ROOT / "docs" / "benchmarks" / "prune.json"
REPORT = ROOT / "docs" / "benchmarks" / "prune.md"
PRUNE = ["mop", "prune", "smollm2-135m", "--target", "0.2", "--target", "0.4", "--seed", "0"]
CASES = {
    "prune-random": PRUNE,
    # seed 4's coin picks width at iterations 1 and 2, so AMP scores the full model twice: the random run's worst case
    "prune-random-seed4": [*PRUNE[:-1], "4"],
    # kl with a reduced short-tuning schedule: 1·t steps of 2 examples of at most 128 tokens; 32 texts of at
    # most 128 tokens (the paper: 10·t steps of 16 examples, 128 texts)
    # issue 27: the same runs with every cut repaired in closed form (one more calibration pass a step)
    "prune-random-lstsq": PRUNE + ["--compensation", "lstsq"],
    "prune-random-seed4-lstsq": [*PRUNE[:-1], "4", "--compensation", "lstsq"],
    # the small recipe's layer criterion: block influence runs a calibration pass every step, so a depth step's
    # repair pass is an extra pass, not the only one (third_to_last's depth steps run none)
    "prune-random-bi": PRUNE + ["--layer-criterion", "block_influence"],
    "prune-random-bi-lstsq": PRUNE + ["--layer-criterion", "block_influence", "--compensation", "lstsq"],
    "prune-kl": PRUNE + ["--path-criterion", "kl", "--tune-steps", "1", "--tune-batch-size", "2",
                         "--tune-micro-batch-size", "2", "--tune-max-length", "128", "--path-samples", "32",
                         "--path-max-length", "128"],
}


def timed_child(command: list[str]) -> dict:
    """Wall seconds and peak RSS (bytes) of a child process; the child's own peak, via wait4."""
    with tempfile.TemporaryDirectory() as out, open(Path(out) / "stderr.log", "w+") as log:
        # stderr to a file, not a pipe: the progress bars would fill a pipe that nobody reads and block the child
        started = time.perf_counter()
        process = subprocess.Popen(command + ["--out", str(Path(out) / "run")], stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if status != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed: {log.read()[-2000:]}")
        run = json.loads((Path(out) / "run" / "run.json").read_text())
    return {"command": " ".join(command + ["--out", "DIR"]), "seconds": round(seconds, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "path": "".join(r["choice"] for r in run["iterations"]),
            "compression": {k: round(v["compression"], 4) for k, v in run["targets"].items()}}


def import_baseline() -> int:
    """Peak RSS of a process that only imports what `mop prune` imports (interpreter + torch + transformers)."""
    code = "import mop.cli, mop.pruning.search, torch, transformers, peft"
    process = subprocess.Popen([sys.executable, "-c", code])
    _, _, usage = os.wait4(process.pid, 0)
    return usage.ru_maxrss * 1024


def amp_throughput(repeats: int = 5) -> dict:
    """Tokens/s of AMP scoring and of the same forward passes without hooks, over 128 Alpaca prompts."""
    from mop import data
    from mop.pruning.criteria import _forward, amp
    from mop.models import load_model
    from mop.pruning.search import SearchConfig

    loaded = load_model("smollm2-135m")
    texts = data.sample(data.load_calibration("alpaca"), 128, 0)
    batch_size = SearchConfig(targets=[]).batch_size
    batches = data.text_batches(loaded.tokenizer, texts, 512, batch_size)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)

    def plain():
        with torch.no_grad():
            for batch in batches:
                _forward(loaded.model, batch)

    def scoring():
        amp(loaded.model, loaded.adapter, batches)

    # plain and AMP passes alternate, so a slowdown of the machine during the measurement hits both alike
    plain(), scoring()  # warm-up
    plain_times, amp_times = [], []
    for _ in range(repeats):
        for fn, times in ((plain, plain_times), (scoring, amp_times)):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    plain_s, amp_s = statistics.median(plain_times), statistics.median(amp_times)
    return {"tokens": tokens, "batch_size": batch_size, "plain_tokens_per_s": round(tokens / plain_s),
            "amp_tokens_per_s": round(tokens / amp_s),
            "amp_fraction_of_plain": round(plain_s / amp_s, 3), "repeats": repeats}


def write_report(results: dict) -> None:
    model_bytes = results["model_bytes"]
    lines = ["# Pruning benchmarks (SmolLM2-135M, CPU)", "",
             f"Machine: {results['machine']}. Produced by `python benchmarks/bench_prune.py`; raw numbers in prune.json.",
             f"Model bytes (fp32): {model_bytes / 2**20:.0f} MiB. Import-only baseline RSS: "
             f"{results['import_baseline_bytes'] / 2**20:.0f} MiB.", "",
             "| case | wall time | peak RSS | peak RSS / model bytes | (peak − import baseline) / model bytes | path |",
             "|---|---|---|---|---|---|"]
    for name in CASES:
        if name in results:
            r = results[name]
            extra = (r["peak_rss_bytes"] - results["import_baseline_bytes"]) / model_bytes
            lines.append(f"| {name} | {r['seconds'] / 60:.1f} min | {r['peak_rss_bytes'] / 2**20:.0f} MiB | "
                         f"{r['peak_rss_bytes'] / model_bytes:.2f}× | {extra:.2f}× | `{r['path']}` |")
    lines += [f"\n{name}: {results[name]['note']}" for name in CASES if "note" in results.get(name, {})]
    repaired = [(name.removesuffix("-lstsq"), name) for name in CASES
                if name.endswith("-lstsq") and name in results and name.removesuffix("-lstsq") in results]
    if repaired:
        lines += ["", "The repair's cost (issue 27's goal: at most 1.5× the same run without it): " + "; ".join(
            f"{name} {results[name]['seconds'] / results[plain]['seconds']:.2f}× {plain}" for plain, name in repaired)
                  + "."]
    lines += ["", "Commands:", ""] + [f"- {name}: `{results[name]['command']}`" for name in CASES if name in results]
    if "amp" in results:
        a = results["amp"]
        lines += ["", "## AMP scoring throughput", "",
                  f"{a['tokens']} tokens of 128 Alpaca prompts, batch {a['batch_size']}, fp32, median of "
                  f"{a['repeats']} alternating passes each: plain forward "
                  f"{a['plain_tokens_per_s']} tok/s, AMP scoring {a['amp_tokens_per_s']} tok/s, "
                  f"fraction {a['amp_fraction_of_plain']} (goal ≥ 0.8)."]
    REPORT.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=[*CASES, "amp"], action="append", help="these cases only (repeatable)")
    parser.add_argument("--redo", action="store_true", help="measure again even if a result is cached")
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                           f"{torch.__version__}, {torch.get_num_threads()} threads",
                   model_bytes=134_515_008 * 4)
    results.setdefault("import_baseline_bytes", import_baseline())
    for name in args.only or [*CASES, "amp"]:
        if name in results and not args.redo:
            continue
        print(f"measuring {name} ...", flush=True)
        results[name] = amp_throughput() if name == "amp" else timed_child(CASES[name])
        RESULTS.write_text(json.dumps(results, indent=1))
        write_report(results)
    write_report(results)
    print(REPORT.read_text())


if __name__ == "__main__":
    main()
