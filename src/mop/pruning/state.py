"""The run directory: `run.json` (identity + iteration log), written atomically after every iteration, so an
interrupted run resumes by replaying the log on the original model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mop.errors import MopError
from mop.provenance import write_json_atomic


@dataclass
class RunState:
    directory: Path
    identity: dict  # everything that decides the path (not the targets)
    header: dict  # source model, original parameter count, versions
    iterations: list[dict] = field(default_factory=list)
    targets: dict[str, dict] = field(default_factory=dict)  # "target-20" -> where it was reached

    @property
    def path(self) -> Path:
        return self.directory / "run.json"

    @classmethod
    def check(cls, directory: Path, identity: dict) -> dict | None:
        """The saved run in `directory`, if any; an error if the directory holds anything else."""
        run_file = directory / "run.json"
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
        if directory.exists() and any(directory.iterdir()):
            raise MopError(f"{directory} is not empty and holds no mop run; choose another --out")
        return None

    @classmethod
    def open(cls, directory: Path, identity: dict, header: dict) -> "RunState":
        saved = cls.check(directory, identity)
        directory.mkdir(parents=True, exist_ok=True)
        if saved is None:
            return cls(directory, identity, header)
        return cls(directory, identity, saved["header"], saved["iterations"], saved.get("targets", {}))

    def save(self) -> None:
        write_json_atomic(self.path, {"identity": self.identity, "header": self.header,
                                      "iterations": self.iterations, "targets": self.targets})
