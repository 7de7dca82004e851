"""Latency model benchmark (issue 28): the latency model of this machine fitted for SmolLM2-135M (`mop.latency.model`:
seven random-weight shapes timed by the protocol), then for the dense model
and each given checkpoint its predicted end-to-end speedup and decode time against the protocol's measurement
(`mop.latency.benchmark` against the dense model, runs alternating; with `--engine vllm`, `mop bench --engine
vllm`'s `benchmark_vllm`).

    MOP_DATA_DIR=../shared/data python benchmarks/bench_latency_model.py [CKPT ...] [--engine vllm] [--threads N]
        [--runs 8] [--warmup 2] [--fit-runs 5] [--fit-warmup 2] [--redo]

Each cell (the fit, the dense model, each checkpoint by its path as given) is cached in
docs/benchmarks/latency_model.json (`latency_model_vllm.json` for vLLM) as soon as it finishes, so a rerun computes
only the missing cells (`--redo`: all of them); the `.md` beside it is rewritten from that file every time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mop.latency import LatencyModel, LatencySettings, benchmark, checkpoint_shape, measure, measure_latency_model
from mop.latency.model import FIT_SETTINGS, ModelShape, model_shape
from mop.latency.protocol import describe_device
from mop.latency.vllm_bench import VllmBenchSettings, benchmark_vllm
from mop.models import LoadedModel, load_model
from mop.provenance import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {"transformers": ROOT / "docs" / "benchmarks" / "latency_model.json",
           "vllm": ROOT / "docs" / "benchmarks" / "latency_model_vllm.json"}
DENSE = "smollm2-135m"
QUIET_LOAD = 3.0  # 1-minute load average at or below which a cell ran alone on the 2-core machine


def fit_cell(dense: LoadedModel, settings: LatencySettings, engine: str) -> dict:
    config = dense.adapter.text_config(dense.model)
    return measure_latency_model(config, settings, engine=engine, tokenizer=dense.tokenizer, refresh=True).record()


def predictions(model: LatencyModel, dense: LoadedModel, shape: ModelShape) -> dict:
    """`shape`'s predicted end-to-end and decode seconds, and its speedup over the dense model when it is smaller."""
    dense_shape = model_shape(dense.model, dense.adapter)
    return {**({} if shape == dense_shape else {"speedup": model.speedup(dense_shape, shape)}),
            "end_to_end_s": model.seconds(shape), "decode_s": model.decode_seconds(shape)}


def vllm_settings(settings: LatencySettings) -> VllmBenchSettings:
    """`mop bench --engine vllm`'s settings with `settings`' runs; the throughput at a batch, which the latency model
    does not predict, at its smallest (3 runs of one request)."""
    return VllmBenchSettings(settings, batch=1, batch_runs=3)


def dense_cell(model: LatencyModel, dense: LoadedModel, settings: LatencySettings, engine: str) -> dict:
    """The dense model timed alone against its predicted times."""
    shape = model_shape(dense.model, dense.adapter)
    if engine == "vllm":
        timed = benchmark_vllm(DENSE, None, vllm_settings(settings))["models"]["candidate"]
    else:
        timed = measure({"dense": dense.model}, dense.tokenizer, settings)["dense"]
    return {"shape": asdict(shape), "load_average": os.getloadavg(),
            "measured": {"end_to_end_s": timed["end_to_end_s"]["mean"],
                         "decode_s": timed["decode_ms_per_token"]["mean"] / 1000},
            "predicted": predictions(model, dense, shape)}


def checkpoint_cell(model: LatencyModel, dense: LoadedModel, directory: str, settings: LatencySettings,
                    engine: str) -> dict:
    """A checkpoint timed against the dense model (the protocol's speedup) against its predicted speedup and times."""
    shape = checkpoint_shape(directory)
    if engine == "vllm":
        record = benchmark_vllm(directory, DENSE, vllm_settings(settings))
    else:
        record = benchmark(load_model(directory), dense, settings)
    written_by_mop = Path(directory) / "mop.json"
    provenance = json.loads(written_by_mop.read_text()) if written_by_mop.is_file() else {}
    timed = record["models"]["candidate"]
    return {"shape": asdict(shape), "params": timed.get("params"), "load_average": os.getloadavg(),
            "method": provenance.get("method"), "path": provenance.get("path"),
            "compression": provenance.get("compression"),
            "measured": {"speedup": record["speedup"]["ratio_of_means"], "speedup_std": record["speedup"]["std"],
                         "end_to_end_s": timed["end_to_end_s"]["mean"],
                         "decode_s": timed["decode_ms_per_token"]["mean"] / 1000},
            "predicted": predictions(model, dense, shape)}


def error(cell: dict, key: str) -> str:
    return f"{100 * (cell['predicted'][key] / cell['measured'][key] - 1):+.1f}%"


def noise(results: dict) -> str:
    """What the load averages at the cells say of the numbers: the benchmark's own two threads make a load of about
    2 on this 2-core machine; more is another job's, and its timings are off by up to tens of percent."""
    loads = [cell["load_average"][0] for cell in results["cells"].values()]
    if loads and max(loads) <= QUIET_LOAD:
        return (f"**Quiet machine.** Every cell ran with a 1-minute load average of at most {max(loads):.1f} (the "
                "benchmark's own threads; nothing else running). What noise is left shows in the ± of each measured speedup (the sample std of the per-run speedups).")
    return ("**Noise.** The machine was shared (the load average at each cell is in the table, the benchmark's own "
            f"threads make about {QUIET_LOAD - 1:.0f}): a timing on it can be off by tens of percent, so part of every "
            "error below is the machine, not the model.")


def write_report(results: dict, engine: str) -> None:
    fit = results["fit"]
    context = fit["context"]
    settings = results["settings"]
    if engine == "vllm":
        machine = f"{context['device']}, {context['dtype']}, vLLM {context['versions']['vllm']}"
    else:
        machine = (f"{context['device']}, {context['torch_threads']} torch thread(s), {context['dtype']}, torch "
                   f"{context['versions']['torch']}, transformers {context['versions']['transformers']}")
    lines = [f"# Latency model in {engine}: predicted against measured (SmolLM2-135M, CPU)", "",
             f"Machine: {machine}. Produced by " + ", then ".join(f"`{c}`" for c in results["commands"])
             + f"; every number in {RESULTS[engine].name}.",
             "", *([f"Checkpoints: {results['checkpoints_made_by']}", ""] if "checkpoints_made_by" in results else []),
             noise(results), ""]
    fitted = context["settings"]
    lines += ["## Fit", "",
              f"`{fit['form']}`, non-negative least squares on relative residuals; seven random-weight shapes "
              f"(`synthetic_shapes`) timed by the protocol ({fitted['runs']} runs, first {fitted['warmup']} "
              f"discarded, {fitted['prompt_tokens']}-token prompt, {fitted['new_tokens']} new tokens; prefill of "
              f"{fitted['prefill_tokens']} tokens).", "",
              "| quantity | fixed ms | per layer µs | per query head µs | per KV head µs | per neuron ns "
              "| worst fit error |",
              "|---|---|---|---|---|---|---|"]
    for quantity, c in fit["coefficients"].items():
        lines.append(f"| {quantity} | {1e3 * c['fixed']:.3f} | {1e6 * c['per_layer']:.1f} | "
                     f"{1e6 * c['per_query_head']:.2f} | {1e6 * c['per_kv_head']:.2f} | {1e9 * c['per_neuron']:.2f} | "
                     f"{100 * fit['max_abs_relative_error'][quantity]:.1f}% |")
    lines += ["", "Fitted shapes (measured decode ms/token, predicted, error):", ""]
    for row in fit["fit"]:
        s = row["shape"]
        lines.append(f"- L{s['layers']} H{s['heads']}/KV{s['kv_heads']} I{s['intermediate']}: "
                     f"{1e3 * row['measured']['decode']:.2f}, {1e3 * row['predicted']['decode']:.2f}, "
                     f"{100 * row['relative_error']['decode']:+.1f}%")
    lines += ["", "## Checkpoints", "",
              f"Protocol: {settings['runs']} runs, first {settings['warmup']} discarded, each checkpoint alternating "
              "with the dense model; speedup = ratio of mean end-to-end times.", "",
              "| model | method | shape | predicted speedup | measured speedup | error | predicted decode ms | "
              "measured decode ms | error | load average |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, cell in results["cells"].items():
        s = cell["shape"]
        shape = f"L{s['layers']} H{s['heads']}/KV{s['kv_heads']} I{s['intermediate']}"
        speedup = (f"{cell['predicted']['speedup']:.3f} | {cell['measured']['speedup']:.3f} ± "
                   f"{cell['measured']['speedup_std']:.3f} | {error(cell, 'speedup')}" if "speedup" in cell["measured"]
                   else "1 | 1 (itself) | –")
        method = f"{cell.get('method') or 'mop'} `{cell['path']}`" if cell.get("path") else "dense"
        lines.append(f"| `{name}` | {method} | {shape} | {speedup} | "
                     f"{1e3 * cell['predicted']['decode_s']:.2f} | {1e3 * cell['measured']['decode_s']:.2f} | "
                     f"{error(cell, 'decode_s')} | {cell['load_average'][0]:.1f} |")
    errors = [cell["predicted"]["speedup"] / cell["measured"]["speedup"] - 1 for cell in results["cells"].values()
              if "speedup" in cell["measured"]]
    if errors:
        lines += ["", f"Speedup error over the {len(errors)} checkpoints: worst {100 * max(map(abs, errors)):.1f}%, "
                      f"mean absolute {100 * sum(map(abs, errors)) / len(errors):.1f}% (the issue's goal: at most 5%)."]
    RESULTS[engine].with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="*", help="pruned checkpoint directories of SmolLM2-135M")
    parser.add_argument("--engine", choices=sorted(RESULTS), default="transformers",
                        help="what is timed: our greedy loop in transformers, or vLLM (its own environment)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fit-runs", type=int, default=FIT_SETTINGS.runs, help="protocol runs per fitted shape")
    parser.add_argument("--fit-warmup", type=int, default=FIT_SETTINGS.warmup)
    parser.add_argument("--redo", action="store_true", help="measure every cell again")
    parser.add_argument("--refit", action="store_true",
                        help="measure the fit again and predict the timed checkpoints by it (their timings stay)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = LatencySettings(runs=args.runs, warmup=args.warmup, time_generate=False)
    path = RESULTS[args.engine]
    results = json.loads(path.read_text()) if path.exists() and not args.redo else {}
    results.update(settings=asdict(settings), device=describe_device(torch.device("cpu")))
    results.setdefault("commands", []).append(" ".join(["MOP_DATA_DIR=../shared/data python "
                                                        "benchmarks/bench_latency_model.py", *sys.argv[1:]]))
    cells = results.setdefault("cells", {})
    dense = load_model(DENSE)

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, results)
        write_report(results, args.engine)

    if "fit" not in results or args.refit:
        print("fitting the latency model ...", flush=True)
        results["fit"] = fit_cell(dense, replace(FIT_SETTINGS, runs=args.fit_runs, warmup=args.fit_warmup),
                                  args.engine)
        save()
    model = LatencyModel.from_record(results["fit"])
    if args.refit:
        for cell in cells.values():
            cell["predicted"] = predictions(model, dense, ModelShape(**cell["shape"]))
        save()
    for name in [DENSE, *args.checkpoints]:
        if name in cells:
            continue
        print(f"timing {name} ...", flush=True)
        cells[name] = (dense_cell(model, dense, settings, args.engine) if name == DENSE
                       else checkpoint_cell(model, dense, name, settings, args.engine))
        save()
    write_report(results, args.engine)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
