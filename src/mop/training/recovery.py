"""Recovery fine-tuning (`mop finetune`): supervised on Alpaca, or distilled from the original model's logits
on raw text; LoRA adapters merged into a plain checkpoint, or every weight of the language model trained
(`trainable="full"`). A resumable state is saved every `save_every` steps in `OUT.finetune-state/`."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import PeftModel

from mop import data
from mop.errors import MopError
from mop.models import adapter_for, load_model, model_adapter, save_checkpoint, saved_weights_sha256
from mop.provenance import command, read_provenance, versions
from mop.training.checkpoints import Checkpoints, state_dir
from mop.training.lora import LoraSettings, attach_lora, merge_lora
from mop.training.loop import make_accelerator, train
from mop.training.losses import LossFn, cross_entropy_sum, distillation_sum

log = logging.getLogger(__name__)

METHODS = ("sft", "kd")
TRAINABLE = ("lora", "full")  # what recovery trains: LoRA adapters (merged), or every language-model weight
MULTIMODAL_LORA = {"rank": 8, "alpha": 16}  # the paper's LoRA for LLaVA-1.5 (its section 4.4)


@dataclass
class FinetuneConfig:
    """Recovery fine-tuning: `sft` learns the responses of Alpaca-format rows; `kd` matches the teacher's
    next-token distributions on raw text. `trainable` says what trains: `lora` adapters on the decoder's seven
    projections, merged at the end, or `full`, every weight of the language model (embeddings and lm_head
    included); `lora` holds the optimizer settings of both (rank, alpha and dropout serve LoRA only)."""

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
    trainable: str = "lora"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise MopError(f"unknown method {self.method}; choose one of {', '.join(METHODS)}")
        if self.trainable not in TRAINABLE:
            raise MopError(f"unknown trainable {self.trainable!r}; choose one of {', '.join(TRAINABLE)}")
        self.lora.validate()
        for name, value in {"save every": self.save_every, "kd temperature": self.kd_temperature}.items():
            if value <= 0:
                raise MopError(f"{name} must be positive, not {value}")
        if self.max_steps is None and self.epochs <= 0 or self.max_steps is not None and self.max_steps <= 0:
            raise MopError("nothing to train: give a positive --epochs or --max-steps")

    def identity(self) -> dict:
        """Everything that decides the weights (how often the state is saved does not). LoRA, the default
        `trainable`, is left out, so runs made before the option keep their identity."""
        unset = {"save_every": self.save_every, "trainable": "lora"}
        return {**{k: v for k, v in asdict(self).items() if not (k in unset and unset[k] == v)},
                "lora": self.lora.identity()}


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


def trainable_model(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """`model` ready to train as `config.trainable` says: wrapped in fresh LoRA adapters on the decoder's seven
    projections (`attach_lora`, base weights frozen), or `model` itself with every parameter of its language model
    trainable (`DecoderAdapter.language_parameters`) and the rest, a VLM's vision tower and projector, frozen."""
    if config.trainable == "lora":
        return attach_lora(model, config.lora, config.seed)
    language = adapter_for(model).language_parameters(model)
    model.requires_grad_(False)
    for parameter in language:
        parameter.requires_grad_(True)
    if any(parameter.dtype != torch.float32 for parameter in language):
        log.warning("full-parameter training in %s: AdamW updates these weights in place, with no float32 copy, "
                    "so updates below their precision are lost; float32 is advised", language[0].dtype)
    return model


def plain_model(trained: nn.Module) -> nn.Module:
    """The trained model as a plain checkpoint holds it: LoRA adapters merged (`merge_lora`), fully trained weights
    as they are."""
    return merge_lora(trained) if isinstance(trained, PeftModel) else trained


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
    """Recovery fine-tuning of `model`, with LoRA adapters merged at the end or every language-model weight
    (`config.trainable`); the result is written to `out` as a plain checkpoint whose mop.json is the source's
    plus a `finetune` record, which is returned.

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
    trained = trainable_model(loaded.model, config)
    progress = train(trained, rows, lora, steps, config.seed, loaded.tokenizer.pad_token_id, loss_fn, accelerator,
                     checkpoints, desc=f"finetune ({config.method}, {config.trainable})")
    plain = plain_model(trained)
    record = {
        "identity": identity, "model": model, "method": config.method, "trainable": config.trainable,
        "settings": asdict(config), **sources,
        "steps": steps, "epochs": steps * lora.batch_size / len(rows), "processes": accelerator.num_processes,
        "device": device, "dtype": dtype, "losses": progress.losses, "step_seconds": progress.step_seconds,
        "seconds": round(sum(progress.step_seconds), 3), "resumed_at": progress.resumed_at,
        # per process, the weights_sha256 its final (merged) weights would be saved with: equal entries, bitwise
        # equal weights; the saved checkpoint's `weights_sha256(out)` is the main process's entry
        "merged_sha256": gather_object([saved_weights_sha256(plain)]),
        "versions": versions(), "command": command(),
    }
    if accelerator.is_main_process:
        save_checkpoint(loaded, plain, out, {**provenance, "finetune": record})
        shutil.rmtree(state_dir(out), ignore_errors=True)
    accelerator.wait_for_everyone()
    return record
