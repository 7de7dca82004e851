"""The quality study of issue 10 on SmolLM2-135M: every method of `mop compare` at 20/30/40%, cell by cell.

A cell is one (target, method, seed): `mop compare` with the study's shared settings up to that target, run in a
child process into `runs/study/` (checkpoints stay there, never in git); its recovery and evaluation take about
20 minutes on 2 quiet cores. Cells run group by group (core comparison, peers, criteria, variants), each group at
20%, 30%, then 40%. The search of a method is nested: a later target extends it. After every cell the small
result files — evaluations, latency records, each checkpoint's mop.json and the settings — are copied to
`docs/study/smollm2/`, the report is rewritten there, and (with --commit) committed. A rerun first copies
`docs/study/smollm2/` back into `runs/study/`, so on a fresh machine only the missing cells (and, within a cell,
the missing targets) run.

    MOP_DATA_DIR=../shared/data python benchmarks/study_quality.py [--only LABEL ...] [--commit] [--bench]
        [--report-only]

`--report-only` rewrites the report, its plots, results.json and summary.md from the records committed under
`docs/study/smollm2/` (evaluations, latency records, mop.json, settings), computing nothing; it needs no checkpoint.

`--bench` is the latency pass: it times every cell already evaluated and computes no new one (run it on a quiet
machine, nothing beside it), by the paper's protocol without also timing `model.generate` (`--bench-no-generate`:
five minutes a cell instead of ten on 2 cores; the speedup is that of mop's greedy loop either way). Latency
depends on the shapes only, so where a recovered checkpoint is gone (a fresh machine) the pipeline re-prunes and
times the pruned one, without recovering it again; and a cell whose architecture was timed already (depth-only
and ShortGPT remove as many layers of one shape; a variant recovered otherwise keeps its search's shapes) takes
that record, with `same_shapes_as` naming the timed cell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "study"
DOCS = ROOT / "docs" / "study" / "smollm2"
MODEL = "smollm2-135m"

# One recovery budget for every method, the largest that fits the 12-hour envelope for the whole grid: 32
# steps of 16 rows of at most 256 tokens (512 of the 999 local Alpaca rows, about 13 minutes on 2 quiet cores; one
# epoch, 63 steps, is measured once for MoP seed 0 at 20% in docs/study/smollm2-epoch1/; the paper: 2 epochs of 52k
# rows of 512 — `--recovery-epochs 2 --recovery-max-length 512` with the 52k file on a GPU). Tasks on fixed
# first-N document subsets, perplexity on the first 32 segments of the standard WikiText-2 protocol (of 148).
TARGETS = (0.2, 0.3, 0.4)
SHARED = ["--recovery-steps", "32", "--recovery-batch-size", "16", "--recovery-micro-batch-size", "8",
          "--recovery-max-length", "256", "--no-activation-checkpointing",
          "--tasks", "arc_easy,hellaswag,piqa,winogrande,wikitext", "--eval-limit", "250", "--eval-ppl-segments", "32",
          "--eval-batch-size", "16"]

SHORT_TUNING = "tune_steps_per_iteration=1,lora.batch_size=4,lora.micro_batch_size=4,lora.max_length=256"
# (label, method spec, seed[, its targets if not all]) in groups, in the order the issue asks for: the core
# comparison, then peers, then criteria, then the variants the evidence suggests; a group is run at 20%, then 30%,
# then 40% before the next.
GROUPS = [
    [("mop", "mop", 0), ("depth", "depth", 0), ("width", "width", 0), ("mop", "mop", 1), ("mop", "mop", 2)],
    [("shortgpt", "shortgpt", 0), ("llm-pruner", "llm-pruner", 0)],
    # the searching criteria with a reduced short tuning: 1·t steps instead of 10·t, of 4 rows of ≤ 256 tokens (the
    # recovery's row length) instead of 16 of ≤ 512; 32 path texts, or 4 segments for ppl
    [("mop-kl", f"mop-kl:path_criterion=kl,path_samples=32,{SHORT_TUNING}", 0),
     ("mop-cosine", f"mop-cosine:path_criterion=cosine,path_samples=32,{SHORT_TUNING}", 0),
     ("mop-ppl", f"mop-ppl:path_criterion=ppl,ppl_segments=4,{SHORT_TUNING}", 0)],
    # block influence as the layer criterion; with it, KD recovery on raw text (C4) from the dense model at the
    # README job's learning rate, the same 32 steps of 16 rows (of 256 tokens: more tokens than Alpaca rows);
    # issue 12: what serving alignment costs, MoP seed 0 with the MLP kept in 64-neuron blocks (at 20% only: the
    # envelope; its pair is MoP seed 0 at 20%)
    [("mop-bi", "mop-bi", 0),
     ("mop-bi-kd", "mop-bi-kd:layer_criterion=block_influence,recovery.method=kd,recovery.learning_rate=0.002", 0),
     ("mop-mlp64", "mop-mlp64:mlp_multiple=64", 0, (0.2,)),
     # two more seeds of mop-bi, the recommended configuration (docs/RESULTS.md)
     ("mop-bi", "mop-bi", 1), ("mop-bi", "mop-bi", 2),
     # the same KD recovery on width-only (the README job's method), at 20%: which part of mop-bi-kd's gain is KD's
     ("width-kd", "width-kd:mode=width,recovery.method=kd,recovery.learning_rate=0.002", 0, (0.2,))],
]


def small_files(root: Path):
    """The result files of a comparison directory: everything but checkpoints' weights and training state."""
    for path in root.rglob("*"):
        if not path.is_file() or ".partial" in str(path) or ".finetune-state" in str(path):
            continue
        relative = path.relative_to(root)
        if relative.parts[-1] in ("compare.json", "pipeline.json") or relative.parts[-2:-1] in (("eval",), ("bench",)) \
                or relative.parts == ("dense", "eval.json"):
            yield relative
        elif relative.name == "mop.json" and len(relative.parts) >= 3 and relative.parts[-3] == "recovered":
            yield relative  # kept only once the evaluation of that checkpoint is in (see `sync`)
        elif relative.parts[0] in ("report.md", "results.json", "cells.jsonl") or relative.suffix == ".png":
            yield relative


def sync(source: Path, target: Path) -> None:
    for relative in small_files(source):
        if relative.name == "mop.json":
            seed_dir = source / Path(*relative.parts[:-3])
            if not (seed_dir / "eval" / f"{relative.parts[-2]}.json").is_file():
                continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, target / relative)


ABOVE_CHANCE = ("arc_easy", "hellaswag", "piqa")  # WinoGrande sits at chance for the dense model (RESULTS.md)


def write_summary() -> None:
    """docs/study/smollm2/summary.md: per target, every method's paths, perplexity and accuracies (mean over
    seeds, with the worst seed), the paper's average and the average of the three tasks above chance."""
    results = json.loads((DOCS / "results.json").read_text())
    mean = lambda values: sum(values) / len(values)
    lines = ["# Study summary (generated by benchmarks/study_quality.py from results.json)", "",
             "Accuracies in % on the first 250 documents (acc_norm; acc for WinoGrande), mean over seeds; "
             "perplexity on the first 32 standard WikiText-2 segments (mean, and the worst seed's); `avg 3` is "
             "the average of ARC-Easy, HellaSwag and PIQA (WinoGrande is at chance for the dense model).", ""]
    header = "| method | seeds | path(s) | compression % | ppl (worst) | ARC-e | HellaSwag | PIQA | WinoGrande | " \
             "average | avg 3 (worst) |"
    dense = results["dense"]
    row = lambda label, rows, paths: (
        f"| {label} | {len(rows)} | {paths} | {100 * mean([r['compression'] for r in rows]):.1f} | "
        f"{mean([r['perplexity'] for r in rows]):.2f} ({max(r['perplexity'] for r in rows):.2f}) | "
        + " | ".join(f"{100 * mean([r['tasks'][t] for r in rows]):.1f}"
                     for t in ("arc_easy", "hellaswag", "piqa", "winogrande"))
        + f" | {100 * mean([r['average'] for r in rows]):.1f} | "
        f"{100 * mean([mean([r['tasks'][t] for t in ABOVE_CHANCE]) for r in rows]):.1f} "
        f"({100 * min(mean([r['tasks'][t] for t in ABOVE_CHANCE]) for r in rows):.1f}) |")
    targets = sorted({name for method in results["methods"].values() for name in method["checkpoints"]})
    for target in targets:
        lines += [f"## {target.removeprefix('target-')}%", "", header, "|" + "---|" * 11, row("dense", [dense], "")]
        for label, method in results["methods"].items():
            rows = list(method["checkpoints"].get(target, {}).values())
            if rows:
                lines.append(row(label, rows, ", ".join(r.get("path") or "" for r in rows)))
        lines.append("")
    (DOCS / "summary.md").write_text("\n".join(lines))


def done(label: str, seed: int, target: float, bench: bool) -> bool:
    name = f"target-{round(target * 100)}.json"
    seed_dir = DOCS / label / f"seed-{seed}"
    return (seed_dir / "eval" / name).is_file() and (not bench or (seed_dir / "bench" / name).is_file())


def architecture(label: str, seed: int, name: str) -> tuple[int, int, int, int]:
    """What latency depends on, from a checkpoint's mop.json: layers removed, KV groups and MLP neurons removed
    from each layer (every method here keeps the widths uniform across layers), parameters."""
    checkpoint = DOCS / label / f"seed-{seed}" / "recovered" / name.removesuffix(".json")
    record = json.loads((checkpoint / "mop.json").read_text())
    widths = [step["width_plan"] for step in record["iterations"] if step["choice"] == "W"]
    return (sum(step["choice"] == "D" for step in record["iterations"]),
            sum(plan["groups_per_layer"] for plan in widths), sum(plan["neurons_per_layer"] for plan in widths),
            record["params"])


def timed_twin(label: str, seed: int, target: float) -> Path | None:
    """A latency record of another cell whose checkpoint has this cell's architecture."""
    name = f"target-{round(target * 100)}.json"
    shapes = architecture(label, seed, name)
    for record in sorted(DOCS.glob(f"*/seed-*/bench/{name}")):
        other_label, other_seed = record.parts[-4], int(record.parts[-3].removeprefix("seed-"))
        if (other_label, other_seed) != (label, seed) and architecture(other_label, other_seed, name) == shapes:
            return record
    return None


def take_timing(label: str, seed: int, target: float, twin: Path, args: argparse.Namespace) -> None:
    """This cell's latency record: the twin's, saying so; then the comparison's report again."""
    from mop.report import write_comparison

    record = json.loads(twin.read_text())
    record["same_shapes_as"] = "/".join(twin.relative_to(DOCS).parts[:2] + (twin.stem,))
    destination = RUNS / label / f"seed-{seed}" / "bench" / twin.name
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps(record, indent=1))
    write_comparison(RUNS, MODEL)
    sync(RUNS, DOCS)
    name = f"{label} seed {seed} at {target:.0%}"
    print(f"[{time.strftime('%H:%M:%S')}] cell {name}: the same shapes as {record['same_shapes_as']}, timed there",
          flush=True)
    if args.commit:
        commit(f"study: latency of {name} (the same shapes as {record['same_shapes_as']})")


def commit(message: str) -> None:
    for attempt in range(5):
        subprocess.run(["git", "add", str(DOCS)], cwd=ROOT, check=False)
        result = subprocess.run(["git", "commit", "-q", "-m", message, "--", str(DOCS)], cwd=ROOT, capture_output=True)
        if result.returncode == 0 or b"nothing to commit" in result.stdout + result.stderr:
            return
        time.sleep(5 * (attempt + 1))  # another git process holds the index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="run only these labels")
    parser.add_argument("--commit", action="store_true", help="commit docs/study after every cell")
    parser.add_argument("--bench", action="store_true",
                        help="the latency pass: time the evaluated cells, compute no new one (on a quiet machine)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report, plots and summary from the committed records; compute nothing")
    args = parser.parse_args()
    if args.report_only:
        from mop.report import write_comparison

        write_comparison(DOCS, MODEL)
        write_summary()
        if args.commit:
            commit("study: report, plots and summary rewritten from the committed records")
        return
    if DOCS.is_dir():
        sync(DOCS, RUNS)
    for group in GROUPS:
        for target in TARGETS:
            for label, spec, seed, *its_targets in group:
                if its_targets and target not in its_targets[0] or args.only and label not in args.only:
                    continue
                evaluated = done(label, seed, target, bench=False)
                if not args.bench and not evaluated:
                    run_cell(label, spec, seed, target, args)
                elif args.bench and evaluated and not done(label, seed, target, bench=True):
                    if twin := timed_twin(label, seed, target):
                        take_timing(label, seed, target, twin, args)
                    else:
                        run_cell(label, spec, seed, target, args)


def run_cell(label: str, spec: str, seed: int, target: float, args: argparse.Namespace) -> None:
    """`mop compare` of one method and seed at every study target up to `target` (the earlier ones are done)."""
    targets = [arg for t in TARGETS if t <= target for arg in ("--target", str(t))]
    command = [sys.executable, "-m", "mop.cli", "compare", MODEL, "--methods", spec, "--seeds", str(seed),
               "--out", str(RUNS), *targets, *SHARED, *(["--bench-no-generate"] if args.bench else ["--no-bench"])]
    name = f"{label} seed {seed} at {target:.0%}"
    print(f"[{time.strftime('%H:%M:%S')}] cell {name}: {' '.join(command[2:])}", flush=True)
    started = time.time()
    result = subprocess.run(command, env=os.environ)
    with (RUNS / "cells.jsonl").open("a") as cells:
        cells.write(json.dumps({"label": label, "seed": seed, "target": target, "returncode": result.returncode,
                                "seconds": round(time.time() - started),
                                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    sync(RUNS, DOCS)
    if (DOCS / "results.json").is_file():
        write_summary()
    if args.commit:
        commit(f"study: {name} ({'done' if result.returncode == 0 else 'partial'})")
    print(f"[{time.strftime('%H:%M:%S')}] cell {name}: exit {result.returncode}, "
          f"{(time.time() - started) / 60:.1f} min", flush=True)

if __name__ == "__main__":
    main()
