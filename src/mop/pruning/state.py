"""The run directory: `run.json` (identity, iteration log, targets written), one checkpoint per target and,
for a run whose steps are repaired, `resume.safetensors`: the current model's weights after a logged iteration.

`run.json` is the only record of what is done, rewritten atomically after every iteration and every checkpoint.
Whatever a kill leaves behind is repaired when the run is opened again: `.partial` leftovers and checkpoints
that `run.json` does not list are removed (the run writes them again, from the same replayed weights), and a
listed checkpoint that is gone is written again. So an interrupted run, rerun, ends with the same files as one
that was never interrupted. The resume point only saves time: a replay recomputes every repair (a calibration
pass each), where the saved weights are read back instead, bitwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from mop.errors import MopError
from mop.provenance import write_json_atomic

RUN_FILE = "run.json"
RESUME_FILE = "resume.safetensors"  # the model's weights after iteration `metadata["iteration"]`
PARTIAL = ".partial"  # suffix of what is being written (mop.models.save_checkpoint, write_json_atomic)
CHECKPOINT_NAME = re.compile(r"(target|speedup)-\d+")  # a compression target's checkpoint, a speed target's


def target_name(target: float) -> str:
    """The checkpoint directory of a target compression: 0.2 -> target-20."""
    return f"target-{round(target * 100):02d}"


@dataclass
class RunState:
    directory: Path
    identity: dict  # everything that decides the path (not the targets)
    header: dict  # source model, original parameter count, versions
    iterations: list[dict] = field(default_factory=list)
    targets: dict[str, dict] = field(default_factory=dict)  # "target-20", "speedup-130" -> where it was reached

    @property
    def path(self) -> Path:
        return self.directory / RUN_FILE

    @classmethod
    def check(cls, directory: Path, identity: dict) -> dict | None:
        """The saved run in `directory`, if any; an error if the directory holds anything else."""
        run_file = directory / RUN_FILE
        if run_file.is_file():
            try:
                saved = json.loads(run_file.read_text())
            except json.JSONDecodeError:
                raise MopError(f"{run_file} is corrupt; remove it or choose another --out") from None
            if saved.get("identity") != identity:
                diff = sorted(k for k in identity.keys() | saved.get("identity", {}).keys()
                              if identity.get(k) != saved.get("identity", {}).get(k))
                raise MopError(f"{directory} holds a different run (differs in: {', '.join(diff)}); choose another --out")
            return saved
        # a run killed while its first run.json was being written leaves only that file's .partial
        if directory.exists() and any(p.name != RUN_FILE + PARTIAL for p in directory.iterdir()):
            raise MopError(f"{directory} is not empty and holds no mop run; choose another --out")
        return None

    @classmethod
    def open(cls, directory: Path, identity: dict, header: dict) -> "RunState":
        """The run in `directory`, repaired after a kill; a new run is written to `run.json` at once."""
        saved = cls.check(directory, identity)
        directory.mkdir(parents=True, exist_ok=True)
        if saved is None:
            state = cls(directory, identity, header)
        else:
            state = cls(directory, identity, saved["header"], saved["iterations"], saved.get("targets", {}))
        state.repair()
        state.save()
        return state

    def repair(self) -> None:
        """Remove what a kill can leave: `.partial` leftovers, checkpoints not listed in `run.json`; forget
        listed checkpoints that are incomplete or gone (the run writes them again). Only names a checkpoint of
        a run can have are touched: a user's `target-20-recovered/` beside them stays."""
        self.targets = {name: reached for name, reached in self.targets.items()
                        if (self.directory / name / "mop.json").is_file()}
        for entry in self.directory.iterdir():
            unlisted = CHECKPOINT_NAME.fullmatch(entry.name) and entry.name not in self.targets  # not `target-20-kd`
            if entry.name.endswith(PARTIAL) or unlisted:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def save(self) -> None:
        write_json_atomic(self.path, {"identity": self.identity, "header": self.header,
                                      "iterations": self.iterations, "targets": dict(sorted(self.targets.items()))})

    def _identity_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()

    def save_resume_point(self, model: nn.Module, iteration: int) -> None:
        """Write `model`'s weights, those after logged `iteration`, to `resume.safetensors` (atomically)."""
        path = self.directory / RESUME_FILE
        partial = path.with_name(path.name + PARTIAL)
        save_model(model, str(partial), metadata={"iteration": str(iteration), "identity": self._identity_sha256()})
        os.replace(partial, path)

    def resume_point(self) -> int:
        """The logged iteration whose weights `resume.safetensors` holds; 0 when there is none for this run."""
        path = self.directory / RESUME_FILE
        if not path.is_file():
            return 0
        with safe_open(str(path), framework="pt") as saved:
            metadata = saved.metadata() or {}
        iteration = int(metadata.get("iteration", 0))
        return iteration if metadata.get("identity") == self._identity_sha256() and iteration <= len(self.iterations) else 0

    def load_resume_point(self, model: nn.Module) -> None:
        """Load the weights of `resume.safetensors` into `model`, which has their shapes (the iterations up to its
        resume point replayed without their repairs)."""
        device = next(model.parameters()).device
        missing, unexpected = load_model(model, str(self.directory / RESUME_FILE), strict=False, device=str(device))
        if missing or unexpected:
            raise MopError(f"{self.directory / RESUME_FILE} does not fit the replayed model; remove it to replay")
