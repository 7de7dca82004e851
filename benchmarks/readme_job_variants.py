"""What the README's job can reach in its 20-minute budget (issue 10 §5): cheap variants of the search at 10/15/20%
without recovery, then 16-step recoveries of the best of them, each scored by WikiText-2 perplexity on the first
8 segments of the standard protocol (the job's own measure; dense: 19.13).

    MOP_DATA_DIR=../shared/data python benchmarks/readme_job_variants.py [--only NAME ...]

Checkpoints go to runs/readme-job/ (git-ignored); each finished evaluation is copied to
docs/study/readme-job/variants/NAME.json, and docs/study/readme-job/variants.md is rewritten from those files,
so a rerun computes only what is missing (a missing checkpoint is pruned again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "readme-job"
DOCS = ROOT / "docs" / "study" / "readme-job"
CALIB = ["--calib-samples", "32"]  # the job's calibration: 32 Alpaca prompts (the paper: 128)
SEARCHES = {  # search name -> mop prune options; targets 10/15/20% of all parameters
    "mop": [],  # the paper's defaults: third-to-last layer, random path, seed 0
    "depth": ["--mode", "depth"],
    "width": ["--mode", "width"],
    "depth-bi": ["--mode", "depth", "--layer-criterion", "block_influence"],
    "mop-bi": ["--layer-criterion", "block_influence"],
}
TARGETS = (10, 15, 20)
RECOVERY = ["--max-steps", "16", "--batch-size", "8", "--micro-batch-size", "8", "--max-length", "256",
            "--no-activation-checkpointing"]  # the job's recovery budget
RECOVERIES = {  # name -> (search, target, mop finetune options)
    "width-10-kd": ("width", 10, ["--method", "kd", "--kd-data", "c4"]),
    "width-10-kd-lr2e-3": ("width", 10, ["--method", "kd", "--kd-data", "c4", "--lr", "2e-3"]),
    "width-10-sft": ("width", 10, ["--method", "sft"]),
    "mop-bi-10-kd-lr2e-3": ("mop-bi", 10, ["--method", "kd", "--kd-data", "c4", "--lr", "2e-3"]),
}
EVAL = ["--tasks", "wikitext", "--ppl-segments", "8"]


def mop(*args: str) -> None:
    print("mop " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "mop.cli", *args], check=True, env=os.environ)


def pruned(search: str, target: int) -> Path:
    checkpoint = WORK / search / f"target-{target}"
    if not (checkpoint / "mop.json").is_file():
        targets = [a for t in TARGETS for a in ("--target", str(t / 100))]
        mop("prune", "smollm2-135m", *SEARCHES[search], *CALIB, *targets, "--out", str(WORK / search))
    return checkpoint


def evaluated(name: str, checkpoint: Path, command: str) -> None:
    record = DOCS / "variants" / f"{name}.json"
    if record.is_file():
        return
    output = WORK / "eval" / f"{name}.json"
    if not output.is_file():
        mop("eval", str(checkpoint), *EVAL, "--output", str(output))
    result = json.loads(output.read_text())
    provenance = json.loads((checkpoint / "mop.json").read_text())
    result["variant"] = {"command": command, "compression": provenance["compression"], "path": provenance["path"],
                         "recovery_seconds": (provenance.get("finetune") or {}).get("seconds")}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=1))


def write_table() -> None:
    rows = []
    for path in sorted((DOCS / "variants").glob("*.json")):
        record = json.loads(path.read_text())
        v = record["variant"]
        ppl = record["tasks"]["wikitext"]["perplexity"]
        rows.append(f"| {path.stem} | {v['compression']:.2%} | `{v['path']}` | {ppl:.2f} | {ppl / DENSE:.2f}× | "
                    f"{'–' if v['recovery_seconds'] is None else round(v['recovery_seconds'])} | `{v['command']}` |")
    lines = ["# README job: what 20 minutes can reach on SmolLM2-135M", "",
             f"WikiText-2 perplexity on the first 8 segments of the standard protocol (dense {DENSE}). Produced by "
             "`MOP_DATA_DIR=../shared/data python benchmarks/readme_job_variants.py`. Recovery seconds were measured "
             "with other work on the same 2 cores (an upper bound).", "",
             "| variant | compression | path | perplexity | × dense | recovery s | command |", "|---|---|---|---|---|---|---|",
             *rows]
    (DOCS / "variants.md").write_text("\n".join(lines) + "\n")


DENSE = 19.13  # docs/study/readme-job/no-recovery/dense/eval.json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="variant names to compute")
    args = parser.parse_args()
    wanted = lambda name: not args.only or name in args.only
    for search in SEARCHES:
        for target in TARGETS:
            name = f"{search}-{target}"
            if wanted(name) and not (DOCS / "variants" / f"{name}.json").is_file():
                options = " ".join([*SEARCHES[search], *CALIB])
                evaluated(name, pruned(search, target), f"mop prune smollm2-135m {options} --target 0.{target}")
    for name, (search, target, options) in RECOVERIES.items():
        if wanted(name) and not (DOCS / "variants" / f"{name}.json").is_file():
            out = WORK / "recovered" / name
            if not (out / "mop.json").is_file():
                mop("finetune", str(pruned(search, target)), *RECOVERY, *options, "--out", str(out))
            evaluated(name, out, f"mop finetune {search}-{target} {' '.join([*RECOVERY, *options])}")
        write_table()
    write_table()
    print((DOCS / "variants.md").read_text())


if __name__ == "__main__":
    main()
