"""Resumable training state: the LoRA weights, optimizer, scheduler and RNG of an interrupted fine-tune."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.nn as nn
from accelerate import Accelerator
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from mop.errors import MopError
from mop.models import input_device
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
    with the LoRA weights only: the base weights never change."""

    ADAPTERS = "adapters.safetensors"

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
        accelerator.load_state(str(self.directory / f"step-{self.saved['step']}"))
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
        """Make accelerate's save_state / load_state keep the LoRA weights of `model` (the unwrapped peft model)
        in place of the whole model. Under FSDP and DeepSpeed accelerate saves the sharded model itself and
        hands the hooks nothing to replace."""

        def save(models, weights, folder):
            if weights:
                weights.clear()
                if accelerator.is_main_process:
                    adapters = get_peft_model_state_dict(model, save_embedding_layers=False)
                    save_file({k: v.contiguous() for k, v in adapters.items()}, Path(folder) / self.ADAPTERS)

        def load(models, folder):
            if models:
                models.clear()
                adapters = load_file(Path(folder) / self.ADAPTERS, device=str(input_device(model)))
                set_peft_model_state_dict(model, adapters)

        accelerator.register_save_state_pre_hook(save)
        accelerator.register_load_state_pre_hook(load)


def state_dir(out: Path) -> Path:
    """Where the resumable state of a fine-tune into `out` lives (removed once `out` is written)."""
    return out.with_name(out.name + ".finetune-state")
