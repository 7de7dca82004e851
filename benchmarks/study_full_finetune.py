"""Full-parameter recovery against LoRA (issue 27), at equal steps: distillation from the dense model on C4 with
the README job's budget (24 steps of 8 segments of 256 tokens, no activation checkpointing), LoRA at its rate
2e-3 against full fine-tuning at 1e-4, 3e-4 and 3e-5, all from one pruned checkpoint (`--pruned DIR`, a
`mop prune` target whose mop.json names the dense model: the teacher), and that checkpoint unrecovered.

A cell is one `mop finetune` run in a child process of its own (so that its peak memory is its own); its result is
`docs/study/full-finetune/<label>.json`: the settings and the equivalent command, the pruned checkpoint and its
weights hash, steps, wall seconds (the whole fine-tune, loading included) and training seconds, per-step losses
and the last one, WikiText-2 perplexity on the first 8 segments of the standard protocol, peak memory, device.
A rerun computes only the cells whose file is missing; a file measured on another checkpoint is refused. Recovered
checkpoints go to `runs/full-finetune/` (never committed).

    MOP_DATA_DIR=../shared/data python benchmarks/study_full_finetune.py --pruned DIR [--only LABEL ...]
                                                                         [--steps 24] [--device cuda]

At equal wall time: the records give each cell's seconds per step; rerun a cell with `--steps N` (its label gets
`-sN`) to give it the time of another.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "study" / "full-finetune"
RUNS = ROOT / "runs" / "full-finetune"
SEGMENTS = 8
STEPS = 24  # the README job's recovery budget
# the README job's recovery (KD on C4, batch 8 of 256 tokens, no activation checkpointing) but what trains
BUDGET = {"method": "kd", "lora": {"batch_size": 8, "max_length": 256, "activation_checkpointing": False}}
CELLS = {  # label stem → (what trains, learning rate); None: the pruned checkpoint as it is
    "none": None,
    "lora-2e-3": ("lora", 2e-3),  # the README job's
    "full-1e-4": ("full", 1e-4),
    "full-3e-4": ("full", 3e-4),
    "full-3e-5": ("full", 3e-5),
}


def label(stem: str, steps: int) -> str:
    return stem if steps == STEPS or CELLS[stem] is None else f"{stem}-s{steps}"


def command(pruned: Path, trainable: str, learning_rate: float, steps: int) -> str:
    return (f"mop finetune {pruned} --out DIR --method kd --trainable {trainable} --lr {learning_rate:g} "
            f"--max-steps {steps} --batch-size 8 --max-length 256 --no-activation-checkpointing")


def peak_memory_mb(device: str) -> float:
    """This process's peak: accelerator memory on a GPU, resident memory otherwise (ru_maxrss is in KiB on Linux)."""
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_cell(stem: str, pruned: Path, steps: int, device: str) -> dict:
    """Recover `pruned` as CELLS[stem] says (or not at all) and measure it."""
    import torch

    from mop import data
    from mop.evaluation.perplexity import segments_perplexity
    from mop.models import load_model, weights_sha256
    from mop.training.checkpoints import state_dir
    from mop.training.recovery import FinetuneConfig, finetune, recovery_lora

    result = {"label": label(stem, steps), "pruned": str(pruned), "pruned_sha256": weights_sha256(pruned),
              "device": device, "torch_threads": torch.get_num_threads()}
    checkpoint = pruned
    if CELLS[stem] is not None:
        trainable, learning_rate = CELLS[stem]
        lora = {**BUDGET["lora"], "learning_rate": learning_rate}
        settings = {**BUDGET, "lora": lora, "trainable": trainable, "max_steps": steps}
        config = FinetuneConfig(**{k: v for k, v in settings.items() if k != "lora"},
                                lora=recovery_lora(str(pruned), **lora))
        checkpoint = RUNS / result["label"]
        for leftover in (checkpoint, state_dir(checkpoint)):
            shutil.rmtree(leftover, ignore_errors=True)  # a resumed run would not time the whole fine-tune
        started = time.perf_counter()
        record = finetune(str(pruned), checkpoint, config, device=device)
        result.update(settings=settings, command=command(pruned, trainable, learning_rate, steps),
                      steps=record["steps"], wall_seconds=round(time.perf_counter() - started, 1),
                      train_seconds=record["seconds"], final_loss=record["losses"][-1], losses=record["losses"])
    loaded = load_model(str(checkpoint), device=device)
    segments = data.text_segments(loaded.tokenizer, data.perplexity_text("wikitext2"), 2048, SEGMENTS)
    result[f"ppl{SEGMENTS}"] = segments_perplexity(loaded.model, segments)
    result["peak_memory_mb"] = peak_memory_mb(device)
    return result


def measured(path: Path, pruned: Path) -> bool:
    """Whether `path` holds this cell measured on `pruned`; a record of another checkpoint is refused."""
    from mop.models import weights_sha256

    if not path.exists():
        return False
    if json.loads(path.read_text())["pruned_sha256"] != weights_sha256(pruned):
        sys.exit(f"{path} was measured on another checkpoint; move it away to measure {pruned}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", type=Path, required=True, help="a pruned checkpoint directory (mop prune)")
    parser.add_argument("--only", action="append", default=[], choices=sorted(CELLS), help="a cell (repeatable)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # the child process of one cell
    args = parser.parse_args()
    if args.cell is not None:
        path = DOCS / f"{label(args.cell, args.steps)}.json"
        result = run_cell(args.cell, args.pruned.resolve(), args.steps, args.device)
        path.with_suffix(".partial").write_text(json.dumps(result, indent=1))
        os.replace(path.with_suffix(".partial"), path)
        print(result["label"], f"ppl{SEGMENTS} {result[f'ppl{SEGMENTS}']:.2f}",
              f"{result.get('wall_seconds', 0)} s", f"{result['peak_memory_mb']} MB", flush=True)
        return
    DOCS.mkdir(parents=True, exist_ok=True)
    failed = 0
    for stem in args.only or CELLS:
        if measured(DOCS / f"{label(stem, args.steps)}.json", args.pruned):
            continue
        child = subprocess.run([sys.executable, __file__, "--pruned", str(args.pruned), "--steps", str(args.steps),
                                "--device", args.device, "--cell", stem])
        failed += child.returncode != 0  # one failed cell does not stop the others; it is rerun next time
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
