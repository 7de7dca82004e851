"""Resumable training state: the trained weights (LoRA adapters, or the whole language model), optimizer,
scheduler and RNG of an interrupted fine-tune."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from mop.errors import MopError
from mop.provenance import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What the loop has done so far; saved beside the optimizer state."""

    step: int = 0  # optimizer steps done
    losses: list[float] = field(default_factory=list)  # per step: mean token loss over the effective batch
    step_seconds: list[float] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)  # steps from which an interrupted run went on


class Checkpoints:
    """Resumable training state in `directory`: `progress.json` (written last, atomically) names the last
    complete `step-N/`, which holds accelerate's saved state (optimizer, scheduler, every process's RNG)
    with the trained parameters only (`trained_parameters`: the LoRA adapters, or every weight of the language
    model in full fine-tuning): the frozen weights never change, so they are not copied."""

    TRAINED = "trained.safetensors"  # before full fine-tuning: `adapters.safetensors`, in peft's names (refused)

    def __init__(self, directory: Path, identity: dict, every: int):
        self.directory, self.identity, self.every = directory, identity, every
        self.saved = self._read()

    @property
    def progress_file(self) -> Path:
        return self.directory / "progress.json"

    def _read(self) -> dict | None:
        if not self.progress_file.is_file():
            return None
        saved = json.loads(self.progress_file.read_text())
        if saved["identity"] != self.identity:
            raise MopError(f"{self.directory} holds the state of another fine-tune; remove it or choose another --out")
        return saved

    def due(self, step: int, steps: int) -> bool:
        return step % self.every == 0 or step == steps

    def resume(self, accelerator: Accelerator, model: nn.Module) -> Progress:
        """Take charge of saving `model`'s training state; returns the saved progress, with the adapters,
        optimizer, scheduler and RNG set back to it (a fresh one if nothing was saved)."""
        self._register_hooks(accelerator, model)
        if self.saved is None:
            return Progress()
        folder = self.directory / f"step-{self.saved['step']}"
        if not (folder / self.TRAINED).is_file():
            raise MopError(f"{folder} has no {self.TRAINED} (a state written by an older mop, or damaged); "
                           f"remove {self.directory} to start the fine-tune over")
        accelerator.load_state(str(folder))
        progress = Progress(**{k: v for k, v in self.saved.items() if k != "identity"})
        progress.resumed_at.append(progress.step)
        if accelerator.is_main_process:
            log.info("resuming %s from step %d", self.directory, progress.step)
        return progress

    def save(self, accelerator: Accelerator, progress: Progress) -> None:
        target = self.directory / f"step-{progress.step}"
        if accelerator.is_main_process:
            shutil.rmtree(target, ignore_errors=True)  # left by a run that died while saving
        accelerator.wait_for_everyone()
        accelerator.save_state(str(target))
        accelerator.wait_for_everyone()  # every process's RNG state is on disk
        if accelerator.is_main_process:
            write_json_atomic(self.progress_file, {"identity": self.identity, **asdict(progress)})
            for old in self.directory.glob("step-*"):
                if old != target:
                    shutil.rmtree(old)

    def _register_hooks(self, accelerator: Accelerator, model: nn.Module) -> None:
        """Make accelerate's save_state / load_state keep the trained parameters of `model` (unwrapped: the peft
        model, or the model itself) in place of the whole model. Under FSDP and DeepSpeed accelerate saves the
        sharded model itself and hands the hooks nothing to replace."""

        def save(models, weights, folder):
            if weights:
                weights.clear()
                if accelerator.is_main_process:
                    trained = {name: p.detach().contiguous() for name, p in trained_parameters(model).items()}
                    save_file(trained, Path(folder) / self.TRAINED)

        def load(models, folder):
            if models:
                models.clear()
                saved, trained = load_file(Path(folder) / self.TRAINED), trained_parameters(model)
                if saved.keys() != trained.keys():
                    raise MopError(f"{folder} holds the state of other parameters than this model trains")
                with torch.no_grad():
                    for name, parameter in trained.items():
                        parameter.copy_(saved[name])

        accelerator.register_save_state_pre_hook(save)
        accelerator.register_load_state_pre_hook(load)


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of `model` that train (requires_grad), by name; a tied tensor once."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def state_dir(out: Path) -> Path:
    """Where the resumable state of a fine-tune into `out` lives (removed once `out` is written)."""
    return out.with_name(out.name + ".finetune-state")
