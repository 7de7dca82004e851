"""Recovery fine-tuning (`mop finetune`): supervised on Alpaca, or distilled from the original model's logits
on raw text; LoRA adapters merged into a plain checkpoint. A resumable state is saved every `save_every` steps
in `OUT.finetune-state/`."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from mop import data
from mop.errors import MopError
from mop.models import load_model, model_adapter, save_checkpoint, saved_weights_sha256
from mop.provenance import command, read_provenance, versions
from mop.training.checkpoints import Checkpoints, state_dir
from mop.training.lora import LoraSettings, attach_lora, merge_lora
from mop.training.loop import make_accelerator, train
from mop.training.losses import LossFn, cross_entropy_sum, distillation_sum

log = logging.getLogger(__name__)

METHODS = ("sft", "kd")
MULTIMODAL_LORA = {"rank": 8, "alpha": 16}  # the paper's LoRA for LLaVA-1.5 (its section 4.4)


@dataclass
class FinetuneConfig:
    """Recovery fine-tuning: `sft` learns the responses of Alpaca-format rows; `kd` matches the teacher's
    next-token distributions on raw text."""

    data: str = "alpaca"  # sft rows: a name or an Alpaca-format file
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    save_every: int = 25  # optimizer steps between resumable states
    method: str = "sft"
    teacher: str | None = None  # kd: default, the source model named in the checkpoint's mop.json
    kd_data: str = "c4"  # kd: raw text, cut into max_length-token segments (not the perplexity text)
    kd_temperature: float = 1.0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise MopError(f"unknown method {self.method}; choose one of {', '.join(METHODS)}")
        self.lora.validate()
        for name, value in {"save every": self.save_every, "kd temperature": self.kd_temperature}.items():
            if value <= 0:
                raise MopError(f"{name} must be positive, not {value}")
        if self.max_steps is None and self.epochs <= 0 or self.max_steps is not None and self.max_steps <= 0:
            raise MopError("nothing to train: give a positive --epochs or --max-steps")

    def identity(self) -> dict:
        """Everything that decides the weights (how often the state is saved does not)."""
        return {**{k: v for k, v in asdict(self).items() if k != "save_every"}, "lora": self.lora.identity()}


def recovery_lora(model: str, **settings) -> LoraSettings:
    """The recovery LoRA settings of `model` (a name as `load_model` takes it): the paper's multimodal setting
    (r=8, α=16) on a vision-language model, SPEC §1's (r=32, α=10) otherwise; `settings` override them."""
    defaults = MULTIMODAL_LORA if model_adapter(model).multimodal else {}
    return LoraSettings(**{**defaults, **settings})


def alpaca_rows(tokenizer, spec: str, max_length: int) -> tuple[list[data.Row], dict]:
    """Alpaca rows (`data.sft_rows`: prompt masked, EOS learned, no BOS mid-sequence, rows with no response
    token dropped) and the record of their source."""
    examples = data.load_examples(spec)
    rows = data.sft_rows(tokenizer, examples, max_length)
    if not rows:
        raise MopError(f"{spec}: no row keeps a response token within {max_length} tokens")
    return rows, {"data": spec, "source": data.source(spec), "examples": len(examples), "rows": len(rows),
                  "dropped": len(examples) - len(rows)}


def text_rows(tokenizer, spec: str, max_length: int) -> tuple[list[data.Row], dict]:
    """Raw text joined and cut into `max_length`-token segments; every next token is a target."""
    texts = data.load_texts(spec)
    segments = [s.tolist() for s in data.token_segments(tokenizer, texts, max_length)]
    rows = [(ids, ids) for ids in segments if len(ids) > 1]
    return rows, {"data": spec, "source": data.source(spec), "texts": len(texts), "rows": len(rows),
                  "dropped": len(segments) - len(rows)}


def finished_record(out: Path) -> dict | None:
    """The record of the fine-tune in `out`, None if `out` is absent or empty, an error if it holds another thing."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    record = read_provenance(out).get("finetune") if out.is_dir() else None
    if record is None:
        raise MopError(f"{out} exists and is not a mop fine-tune; choose another --out")
    return record


def _training_device(device: str, accelerator: Accelerator) -> str:
    """One process: `device` as given. Several: each process on its own accelerator device (or the CPU)."""
    if accelerator.num_processes == 1:
        return device
    if device not in ("cpu", "cuda"):
        raise MopError(f"with {accelerator.num_processes} processes, --device is cpu or cuda (one GPU per process)")
    return str(accelerator.device)


def _teacher_name(config: FinetuneConfig, provenance: dict, model: str) -> str | None:
    """kd: the teacher given, else the source model that mop pruned `model` from."""
    if config.method != "kd":
        return None
    teacher = config.teacher or provenance.get("source", {}).get("name")
    if teacher is None:
        raise MopError(f"{model} has no mop.json naming its source model: give the teacher with --teacher")
    return teacher


def _objective(config: FinetuneConfig, loaded, teacher: str | None, provenance: dict, device: str,
               dtype: str) -> tuple[list[data.Row], LossFn, dict]:
    """The rows and loss of the configured method, and the record of their sources; the teacher is loaded
    on the student's device, in its dtype."""
    lora, tokenizer = config.lora, loaded.tokenizer
    if config.method == "sft":
        rows, data_record = alpaca_rows(tokenizer, config.data, lora.max_length)
        return rows, cross_entropy_sum, {"data": data_record, "teacher": None}
    reference = load_model(teacher, device, dtype)
    if reference.model.config.get_text_config().vocab_size != loaded.model.config.get_text_config().vocab_size:
        raise MopError(f"teacher {teacher} has another vocabulary than the model")
    recorded = provenance.get("source", {}).get("sha256")
    if config.teacher is None and recorded and recorded != reference.weights_sha256:
        log.warning("teacher %s: weights differ from the source recorded in mop.json", teacher)
    rows, data_record = text_rows(tokenizer, config.kd_data, lora.max_length)
    sources = {"data": data_record,
               "teacher": {"name": teacher, "sha256": reference.weights_sha256, "temperature": config.kd_temperature}}
    return rows, distillation_sum(reference.model, config.kd_temperature), sources


def finetune(model: str, out: Path, config: FinetuneConfig, device: str = "cpu", dtype: str = "float32") -> dict:
    """Recovery fine-tuning of `model` with LoRA; the adapters are merged and the result is written to `out`
    as a plain checkpoint whose mop.json is the source's plus a `finetune` record, which is returned.

    Re-running resumes from `OUT.finetune-state/`; a finished `out` of the same settings is left as it is."""
    config.validate()
    finished = finished_record(out)  # a foreign `out` is refused before the model loads
    accelerator = make_accelerator(device)
    where = _training_device(device, accelerator)
    loaded = load_model(model, where, dtype)
    provenance = read_provenance(loaded.directory)
    teacher = _teacher_name(config, provenance, model)
    identity = {"model_sha256": loaded.weights_sha256, "dtype": dtype, "processes": accelerator.num_processes,
                **config.identity(), "teacher": teacher}
    if finished is not None:
        if finished.get("identity") != identity:
            raise MopError(f"{out} holds a fine-tune with other settings; choose another --out")
        log.info("%s is already this fine-tune; left as it is", out)
        return finished
    checkpoints = Checkpoints(state_dir(out), identity, config.save_every)  # refuses another fine-tune's state

    lora = config.lora
    rows, loss_fn, sources = _objective(config, loaded, teacher, provenance, where, dtype)
    steps = config.max_steps or math.ceil(config.epochs * len(rows) / lora.batch_size)
    peft_model = attach_lora(loaded.model, lora, config.seed)
    progress = train(peft_model, rows, lora, steps, config.seed, loaded.tokenizer.pad_token_id, loss_fn, accelerator,
                     checkpoints, desc=f"finetune ({config.method})")
    merged = merge_lora(peft_model)
    record = {
        "identity": identity, "model": model, "method": config.method, "settings": asdict(config), **sources,
        "steps": steps, "epochs": steps * lora.batch_size / len(rows), "processes": accelerator.num_processes,
        "device": device, "dtype": dtype, "losses": progress.losses, "step_seconds": progress.step_seconds,
        "seconds": round(sum(progress.step_seconds), 3), "resumed_at": progress.resumed_at,
        # per process, the weights_sha256 its merged weights would be saved with: equal entries, bitwise equal
        # weights; the saved checkpoint's `weights_sha256(out)` is the main process's entry
        "merged_sha256": gather_object([saved_weights_sha256(merged)]),
        "versions": versions(), "command": command(),
    }
    if accelerator.is_main_process:
        save_checkpoint(loaded, merged, out, {**provenance, "finetune": record})
        shutil.rmtree(state_dir(out), ignore_errors=True)
    accelerator.wait_for_everyone()
    return record
