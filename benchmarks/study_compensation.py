"""The compensation study of issue 27 on SmolLM2-135M, no recovery: every method at 20/30/40% without and
with the closed-form repair (`--compensation lstsq`), and each with Alpaca, C4 and WikiText-2-validation
calibration text, then WikiText-2 perplexity by the standard protocol on the first 8 and 32 segments.

A cell is one search (one method, compensation, calibration, seed) to the three targets, pruned in-process;
its result is `docs/study/compensation/<label>.json` (the settings, the equivalent `mop prune` command, per
target the size, path, perplexities and the mean reconstruction errors, and the device). A rerun computes only
the cells whose file is missing. Checkpoints go to `runs/compensation/` (never committed).

    MOP_DATA_DIR=../shared/data python benchmarks/study_compensation.py [--only LABEL ...] [--device cuda]
        [--workers N] [--recover kd24|study32] [--tasks N]

`--recover kd24` also recovers each target with the README job's KD budget (RECOVERIES) and measures it again,
`--recover study32` with the quality study's;
`--tasks N` adds the four tasks on their first N documents to every finished cell whose checkpoints are still here.

Everything but the compensation and the calibration text is the defaults of `mop prune` (the paper's AMP on
128 prompts of at most 512 tokens), as in the quality study's rows (docs/RESULTS.md), so a compensated row
differs from the row beside it by the compensation only, and a calibration row by its text only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "study" / "compensation"
RUNS = ROOT / "runs" / "compensation"
MODEL = "smollm2-135m"
TARGETS = (0.2, 0.3, 0.4)
SEGMENTS = (8, 32)
CALIBRATIONS = ("alpaca", "c4", "wikitext2-valid")
TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")

# label stem → (SearchConfig fields, seeds)
METHODS = {
    "width": ({"mode": "width"}, (0,)),
    "llm-pruner": ({"method": "llm-pruner"}, (0,)),
    "shortgpt": ({"method": "shortgpt"}, (0,)),
    "mop-bi": ({"layer_criterion": "block_influence"}, (0, 1, 2)),
    "mop": ({}, (0,)),  # the paper's: third-to-last layer, random path
}
# recovery name → FinetuneConfig fields (LoRA fields under "lora"); `--recover NAME` recovers each cell's targets
RECOVERIES = {
    # the README job's budget: KD from the dense model on C4, 24 steps of 8 segments of 256 tokens, LoRA rate 2e-3
    "kd24": {"method": "kd", "max_steps": 24,
             "lora": {"learning_rate": 2e-3, "batch_size": 8, "max_length": 256, "activation_checkpointing": False}},
    # the quality study's (benchmarks/study_quality.py): LoRA SFT on Alpaca, 32 steps of 16 rows of at most 256
    # tokens, the paper's learning rate
    "study32": {"max_steps": 32, "lora": {"batch_size": 16, "micro_batch_size": 8, "max_length": 256,
                                          "activation_checkpointing": False}},
}


# the ridges every "lstsq" cell was measured with (the default until benchmarks/ablation_repair.py measured better)
FIRST_RIDGES = {"compensation_ridge": 1e-2, "compensation_depth_ridge": 1e-2}
# the ablation's first choice (width 1e-1, depth 1e-3; its later cell 1e-4 made that the depth default): cells
# labelled "-r0.1-d0.001"
RIDGES = {"compensation_ridge": 1e-1, "compensation_depth_ridge": 1e-3}


def cells() -> dict[str, dict]:
    """label → SearchConfig fields. Labels: METHOD[-sSEED]-COMPENSATION-CALIB[-nSAMPLES | -pWINDOWS][-rR-dD]."""
    found = {}
    for stem, (fields, seeds) in METHODS.items():
        for seed in seeds:
            for compensation in ("none", "lstsq"):
                for calib in CALIBRATIONS:
                    label = f"{stem}{f'-s{seed}' if len(seeds) > 1 else ''}-{compensation}-{calib}"
                    found[label] = {**fields, "seed": seed, "compensation": compensation, "calib": calib,
                                    **(FIRST_RIDGES if compensation == "lstsq" else {})}
    # the README job's candidates at 20%: the small recipe's search and width-only, on the job's 32 calibration
    # prompts and on the default 128, with the first ridges and with the measured ones
    for stem, fields in {"mop-bi": {"layer_criterion": "block_influence"}, "width": {"mode": "width"}}.items():
        repaired = {**fields, "compensation": "lstsq", "calib": "wikitext2-valid"}
        found[f"{stem}-lstsq-wikitext2-valid-n32"] = {**repaired, "calib_samples": 32, **FIRST_RIDGES}
        found[f"{stem}-lstsq-wikitext2-valid-n32-r0.1-d0.001"] = {**repaired, "calib_samples": 32, **RIDGES}
        found[f"{stem}-lstsq-wikitext2-valid-r0.1-d0.001"] = {**repaired, **RIDGES}
    # the layer criterion that ranks layers by what the depth repair leaves (`repair_error`) against block
    # influence, in the search and depth-only, on the job's 32 prompts
    # (seeds 1 and 2 of both criteria too), and the mixture's on the default 128 prompts
    for stem, fields in {"mop-re": {"layer_criterion": "repair_error"},
                         **{f"mop-{c}-s{seed}": {"layer_criterion": criterion, "seed": seed} for seed in (1, 2)
                            for c, criterion in (("bi", "block_influence"), ("re", "repair_error"))},
                         "depth-bi": {"mode": "depth", "layer_criterion": "block_influence"},
                         "depth-re": {"mode": "depth", "layer_criterion": "repair_error"}}.items():
        found[f"{stem}-lstsq-wikitext2-valid-n32-r0.1-d0.001"] = {
            **fields, "compensation": "lstsq", "calib": "wikitext2-valid", "calib_samples": 32, **RIDGES}
    found["mop-re-lstsq-wikitext2-valid-r0.1-d0.001"] = {
        "layer_criterion": "repair_error", "compensation": "lstsq", "calib": "wikitext2-valid", **RIDGES}
    # the width criterion that ranks units by what the width repair leaves (`--width-criterion repair_error`)
    # against AMP, width-only on the job's 32 prompts
    found["width-wre-lstsq-wikitext2-valid-n32-r0.1-d0.001"] = {
        "mode": "width", "width_criterion": "repair_error", "compensation": "lstsq", "calib": "wikitext2-valid",
        "calib_samples": 32, **RIDGES}
    # packed calibration (`--calib-packed`): 64 windows of 512 tokens of the joined validation text (32,768
    # tokens, against 17,454 in the default 128 prompts), the mixture and width-only
    packed = {"compensation": "lstsq", "calib": "wikitext2-valid", "calib_samples": 64, "calib_packed": True}
    for stem, fields in {"mop-bi": {"layer_criterion": "block_influence"}, "width": {"mode": "width"}}.items():
        found[f"{stem}-lstsq-wikitext2-valid-p64-r0.1-d0.001"] = {**fields, **packed, **RIDGES}
    # ... and the mixture at the library's default ridges (width 1e-1, depth 1e-4), by both layer criteria
    for stem, fields in {"mop-bi": {"layer_criterion": "block_influence"}, "mop-re": {"layer_criterion": "repair_error"}}.items():
        found[f"{stem}-lstsq-wikitext2-valid-p64"] = {**fields, **packed}
    # ... and the mixture on 128 windows (65,536 tokens), where the one-shot ablation's depth repair gained most
    for seed in (0, 1, 2):
        found[f"mop-bi{f'-s{seed}' if seed else ''}-lstsq-wikitext2-valid-p128"] = {
            "layer_criterion": "block_influence", **({"seed": seed} if seed else {}), **packed, "calib_samples": 128}
    # ... and seeds 1 and 2 of the mixture with block influence, for the seed spread
    for seed in (1, 2):
        found[f"mop-bi-s{seed}-lstsq-wikitext2-valid-p64"] = {"layer_criterion": "block_influence", "seed": seed,
                                                              **packed}
    # ... and every method on the same windows without and with the repair, so that the windows have a table of
    # their own (seed 0 of the mixture is the unsuffixed label above; width-only's repaired cell is the
    # "-r0.1-d0.001" one above, whose depth ridge a width step never uses)
    for stem, (fields, seeds) in METHODS.items():
        for seed in seeds:
            for compensation in ("none", "lstsq"):
                label = f"{stem}{f'-s{seed}' if seed else ''}-{compensation}-wikitext2-valid-p64"
                if label != "width-lstsq-wikitext2-valid-p64":
                    found.setdefault(label, {**fields, **({"seed": seed} if seed else {}), **packed,
                                             "compensation": compensation})
    # ... and with a scored path on the windows: each repaired candidate's KL from the dense model on 32
    # validation paragraphs of 256 tokens (the calibration's split, a different draw), untuned
    found["mop-bi-kl-lstsq-wikitext2-valid-p64"] = {
        "layer_criterion": "block_influence", "path_criterion": "kl", "tune_steps_per_iteration": 0,
        "path_data": "wikitext2-valid", "path_samples": 32, "path_max_length": 256, **packed}
    # the mixture with a scored path, on the job's 32 prompts: the path criterion compares the repaired candidates
    # by their KL from the dense model on held-out text (C4, not the calibration text), untuned (no short tuning)
    found["mop-bi-kl-lstsq-wikitext2-valid-n32-r0.1-d0.001"] = {
        "layer_criterion": "block_influence", "path_criterion": "kl", "tune_steps_per_iteration": 0,
        "path_data": "c4", "path_samples": 32, "path_max_length": 256, "compensation": "lstsq",
        "calib": "wikitext2-valid", "calib_samples": 32, **RIDGES}
    return found


def command(fields: dict, targets: tuple[float, ...] = TARGETS) -> str:
    options = {"method": "--method", "mode": "--mode", "layer_criterion": "--layer-criterion", "seed": "--seed",
               "width_criterion": "--width-criterion",
               "compensation": "--compensation", "calib": "--calib", "compensation_ridge": "--compensation-ridge",
               "compensation_depth_ridge": "--compensation-depth-ridge", "calib_samples": "--calib-samples",
               "path_criterion": "--path-criterion", "tune_steps_per_iteration": "--tune-steps",
               "path_data": "--path-data", "path_samples": "--path-samples", "path_max_length": "--path-max-length",
               "calib_packed": "--calib-packed"}
    written = [options[k] if v is True else f"{options[k]} {v}" for k, v in fields.items()]
    return f"mop prune {MODEL} " + " ".join(f"--target {t}" for t in targets) + " " + " ".join(written) + " --out DIR"


def done(label: str, targets: tuple[float, ...], recovery: str | None) -> bool:
    """Whether the cell's record holds every target of `targets` (recovered by `recovery`, when given)."""
    path = DOCS / f"{label}.json"
    if not path.exists():
        return False
    measured = json.loads(path.read_text())["targets"]
    return all(target_name(t) in measured and (recovery is None or recovery in measured[target_name(t)].get(
        "recovered", {})) for t in targets)


def target_name(target: float) -> str:
    return f"target-{round(100 * target)}"


def recover(checkpoint: Path, recovery: str, device: str, segments: list) -> dict:
    """Recover `checkpoint` by `RECOVERIES[recovery]` (into a sibling folder `<name>-<recovery>`) and measure its
    perplexity on the first n of `segments` for each n in SEGMENTS."""
    from mop.evaluation.perplexity import segments_perplexity
    from mop.models import load_model
    from mop.training.recovery import FinetuneConfig, finetune, recovery_lora

    fields = dict(RECOVERIES[recovery])
    config = FinetuneConfig(**{k: v for k, v in fields.items() if k != "lora"},
                            lora=recovery_lora(str(checkpoint), **fields["lora"]))
    out = checkpoint.with_name(f"{checkpoint.name}-{recovery}")
    record = finetune(str(checkpoint), out, config, device=device)
    model = load_model(str(out), device=device).model
    return {"settings": fields, "seconds": record["seconds"], "last_loss": record["losses"][-1],
            **{f"ppl{n}": segments_perplexity(model, segments[:n]) for n in SEGMENTS}}


def recover_cell(label: str, targets: tuple[float, ...], recovery: str, device: str) -> dict:
    """The record of a pruned cell with its checkpoints at `targets` recovered by `recovery` and measured."""
    from mop import data
    from mop.models import load_model

    result = json.loads((DOCS / f"{label}.json").read_text())
    segments = data.text_segments(load_model(MODEL).tokenizer, data.perplexity_text("wikitext2"), 2048, max(SEGMENTS))
    for target in targets:
        measured = result["targets"][target_name(target)]
        if recovery not in measured.get("recovered", {}):
            measured["recovered"] = {**measured.get("recovered", {}),
                                     recovery: recover(RUNS / label / target_name(target), recovery, device, segments)}
    return result


def run_cell(label: str, fields: dict, device: str, targets: tuple[float, ...], recovery: str | None) -> dict:
    from mop import data
    from mop.evaluation.perplexity import segments_perplexity
    from mop.models import load_model
    from mop.pruning import methods
    from mop.pruning.search import SearchConfig

    started = time.perf_counter()
    loaded = load_model(MODEL, device=device)
    out = RUNS / label
    methods.prune(loaded, SearchConfig(targets=list(targets), **fields), out)
    prune_seconds = time.perf_counter() - started
    segments = data.text_segments(loaded.tokenizer, data.perplexity_text("wikitext2"), 2048, max(SEGMENTS))
    result = {"label": label, "settings": fields, "command": command(fields, targets), "device": device,
              "prune_seconds": round(prune_seconds, 1), "targets": {}}
    for target in targets:
        name = target_name(target)
        record = json.loads((out / name / "mop.json").read_text())
        model = load_model(str(out / name), device=device).model
        compensation = record.get("compensation", {})
        result["targets"][name] = {
            "params": record["params"], "compression": record["compression"], "path": record["path"],
            **{f"ppl{n}": segments_perplexity(model, segments[:n]) for n in SEGMENTS},
            "mean_error_before": compensation.get("mean_error_before"),
            "mean_error_after": compensation.get("mean_error_after"),
        }
        if recovery is not None:
            result["targets"][name]["recovered"] = {recovery: recover(out / name, recovery, device, segments)}
    return result


def task_cell(label: str, limit: int) -> None:
    """The four tasks on the first `limit` documents of each, for each checkpoint of cell `label` that lacks them
    (the record is rewritten after each)."""
    from mop.evaluation.harness import accuracy, paper_average
    from mop.models import load_model

    path = DOCS / f"{label}.json"
    result = json.loads(path.read_text())
    for name, measured in result["targets"].items():
        checkpoint = RUNS / label / name
        if measured.get("tasks_limit") == limit or not checkpoint.is_dir():
            continue
        tasks = accuracy(load_model(str(checkpoint)), list(TASKS), limit, batch_size=8)
        measured |= {"tasks": tasks, "average": paper_average(tasks)[0], "tasks_limit": limit}
        path.with_suffix(".partial").write_text(json.dumps(result, indent=1))
        os.replace(path.with_suffix(".partial"), path)
        print(label, name, f"average {100 * measured['average']:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1, help="cells run at once (child processes)")
    parser.add_argument("--targets", type=float, nargs="+", default=TARGETS, help="a first pass at fewer targets")
    parser.add_argument("--recover", choices=sorted(RECOVERIES), default=None,
                        help="also recover every target by this budget and measure it")
    parser.add_argument("--tasks", type=int, metavar="N",
                        help="only add the four tasks on their first N documents to the finished cells")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    targets = tuple(args.targets)
    DOCS.mkdir(parents=True, exist_ok=True)
    if args.tasks:
        for label in cells():
            if (not args.only or label in args.only) and (DOCS / f"{label}.json").exists():
                task_cell(label, args.tasks)
        return
    todo = {k: v for k, v in cells().items()
            if (not args.only or k in args.only) and not done(k, targets, args.recover)}
    if args.worker is None and args.workers > 1:
        from mop.models import embedded_model_dir

        embedded_model_dir(MODEL)  # converted once, before the workers share it
        children = [subprocess.Popen([sys.executable, __file__, "--device", args.device, "--workers",
                                      str(args.workers), "--worker", str(w), "--targets", *map(str, targets),
                                      *(["--recover", args.recover] if args.recover else []),
                                      *sum((["--only", k] for k in todo), [])])
                    for w in range(args.workers)]
        sys.exit(max(child.wait() for child in children))
    for index, (label, fields) in enumerate(todo.items()):
        if args.worker is not None and index % args.workers != args.worker:
            continue
        try:
            if done(label, targets, None) and all((RUNS / label / target_name(t)).is_dir() for t in targets):
                result = recover_cell(label, targets, args.recover, args.device)  # pruned: recover only
            else:
                result = run_cell(label, fields, args.device, targets, args.recover)
        except Exception as error:  # one failed cell does not stop the others; it is rerun next time
            print(f"{label}: failed: {error!r}", flush=True)
            continue
        path = DOCS / f"{label}.json"
        if path.exists():  # targets and recoveries measured earlier stay
            earlier = json.loads(path.read_text())["targets"]
            for name, measured in result["targets"].items():
                if recovered := {**earlier.get(name, {}).get("recovered", {}), **measured.get("recovered", {})}:
                    measured["recovered"] = recovered
            result["targets"] = {**earlier, **result["targets"]}
        path.with_suffix(".partial").write_text(json.dumps(result, indent=1))
        os.replace(path.with_suffix(".partial"), path)
        t = result["targets"]
        print(label, " ".join(f"{n}:{v['ppl8']:.2f}" for n, v in t.items()), f"{result['prune_seconds']}s", flush=True)


if __name__ == "__main__":
    main()
