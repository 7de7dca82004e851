"""LoRA fine-tuning: one training loop for the short tuning of MoP candidates and for the final recovery
fine-tuning (`mop finetune`: supervised on Alpaca, or distilled from the original model's logits).

The loop is built on `accelerate`, so `accelerate launch` runs it on several processes (DDP or FSDP) with no
code change; on one process it is a plain PyTorch loop. Recovery fine-tuning saves a resumable state every
`save_every` steps in `OUT.finetune-state/` and writes the merged model as a plain checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from mop import data
from mop.criteria import input_device
from mop.errors import MopError
from mop.models import load_model, save_checkpoint
from mop.state import write_json_atomic

log = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # label of a position that is not learned (prompt, padding)
METHODS = ("sft", "kd")

Row = tuple[list[int], list[int]]  # (input_ids, labels): labels[t] = IGNORE where token t is not a target
LossFn = Callable[[nn.Module, data.Batch], torch.Tensor]  # summed over the batch's target positions (nats)


@dataclass
class LoraSettings:
    """The paper's recovery settings (SPEC §1); the short tuning of candidates uses the same ones."""

    rank: int = 32
    alpha: int = 10
    dropout: float = 0.05
    learning_rate: float = 3e-4
    batch_size: int = 16  # examples per optimizer step, over all processes
    micro_batch_size: int = 4  # examples per forward/backward (gradient accumulation fills batch_size)
    max_length: int = 512  # tokens per example
    # recompute each decoder layer's activations in the backward pass: with frozen base weights the backward
    # is about one forward, so a step costs ~1.5x the compute (1.75x measured, docs/benchmarks/finetune.md), and
    # the activations of one layer are held at a time instead of all of them (~0.5x the peak memory)
    activation_checkpointing: bool = True


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
        lora = self.lora
        if self.method not in METHODS:
            raise MopError(f"unknown method {self.method}; choose one of {', '.join(METHODS)}")
        positive = {"batch size": lora.batch_size, "micro batch size": lora.micro_batch_size,
                    "max length": lora.max_length, "rank": lora.rank, "save every": self.save_every,
                    "learning rate": lora.learning_rate, "kd temperature": self.kd_temperature}
        for name, value in positive.items():
            if value <= 0:
                raise MopError(f"{name} must be positive, not {value}")
        if self.max_steps is None and self.epochs <= 0 or self.max_steps is not None and self.max_steps <= 0:
            raise MopError("nothing to train: give a positive --epochs or --max-steps")
        if not 0 <= lora.dropout < 1:
            raise MopError(f"dropout must be in [0, 1), not {lora.dropout}")

    def identity(self) -> dict:
        """Everything that decides the weights (how often the state is saved does not)."""
        return {k: v for k, v in asdict(self).items() if k != "save_every"}


def attach_lora(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """Wrap the seven projections with LoRA adapters (initialised from `seed`); base weights are frozen."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=list(PROJECTIONS)
    )
    return get_peft_model(model, config)


# ---------------------------------------------------------------- losses


def target_count(row: Row) -> int:
    """Positions of `row` that enter the loss: those whose next token is a target."""
    return sum(label != IGNORE for label in row[1][1:])


def target_logits(model: nn.Module, batch: data.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is a target, float32 [N, V], and those targets [N].

    Only these N rows are kept (and, in training, given a gradient): the [B, T, V] logits are freed at once."""
    is_target = batch.labels[:, 1:] != IGNORE  # [B, T-1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return logits[:, :-1][is_target].float(), batch.labels[:, 1:][is_target]


def cross_entropy_sum(model: nn.Module, batch: data.Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens (labels ≠ IGNORE)."""
    logits, targets = target_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum")


def distillation_sum(teacher: nn.Module, temperature: float = 1.0) -> LossFn:
    """Summed KL(teacher ‖ student) over the vocabulary at every target position, on logits / temperature
    (× temperature², so gradients keep their scale)."""

    def loss(model: nn.Module, batch: data.Batch) -> torch.Tensor:
        with torch.no_grad():
            reference = F.log_softmax(target_logits(teacher, batch)[0] / temperature, dim=-1)
        student = F.log_softmax(target_logits(model, batch)[0] / temperature, dim=-1)
        return F.kl_div(student, reference, log_target=True, reduction="sum") * temperature**2

    return loss


# ---------------------------------------------------------------- resumable state


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


# ---------------------------------------------------------------- the loop


def row_order(n: int, count: int, seed: int) -> list[int]:
    """The first `count` indices of a seeded stream of epochs, each a fresh permutation of range(n)."""
    generator, order = random.Random(seed), []
    while len(order) < count:
        epoch = list(range(n))
        generator.shuffle(epoch)
        order += epoch
    return order[:count]


def _batch(rows: list[Row], pad_id: int, device: torch.device) -> data.Batch:
    batch = data.collate([ids for ids, _ in rows], pad_id, [labels for _, labels in rows])
    return data.Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device))


def make_accelerator(device: str) -> Accelerator:
    """An Accelerator that leaves model placement to us (`load_model` places it; the search's candidates
    share weights with the model and must not be moved)."""
    return Accelerator(cpu=device == "cpu", device_placement=False)


@contextmanager
def checkpointed_activations(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Activation checkpointing of `model`'s decoder layers (transformers' own, non-reentrant) for the block."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not enabled or not getattr(base, "supports_gradient_checkpointing", False):
        yield
        return
    base.activation_checkpointing_enable()
    try:
        yield
    finally:
        base.activation_checkpointing_disable()
        base.disable_input_require_grads()  # the embedding hook enable() adds; disable() leaves it to HF's peft


def train(model: nn.Module, rows: list[Row], settings: LoraSettings, steps: int, seed: int, pad_id: int,
          loss_fn: LossFn = cross_entropy_sum, accelerator: Accelerator | None = None,
          checkpoints: Checkpoints | None = None, desc: str = "tuning") -> Progress:
    """`steps` AdamW steps of `settings.batch_size` rows each, linear decay to 0, on the trainable
    parameters of `model` (its LoRA adapters).

    Step s takes rows `row_order(...)[s·B : (s+1)·B]`; each of the N processes takes a contiguous B/N share
    and runs it in micro-batches, syncing gradients on the last one only. Every micro-batch's loss is its
    summed token loss × N / (target positions of the whole effective batch): DDP averages gradients over
    the N processes, so each step follows the gradient of the mean token loss over all B rows, whatever the
    split. Returns the progress (per-step losses, in nats per target token)."""
    if steps and not rows:
        raise MopError("no rows to train on")
    accelerator = accelerator or make_accelerator(input_device(model).type)
    processes, rank = accelerator.num_processes, accelerator.process_index
    if settings.batch_size % processes:
        raise MopError(f"batch size {settings.batch_size} is not a multiple of the {processes} processes")
    device = input_device(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(schedule)
    order = row_order(len(rows), steps * settings.batch_size, seed)
    share = settings.batch_size // processes
    torch.manual_seed(seed + rank)  # LoRA dropout
    progress = checkpoints.resume(accelerator, model) if checkpoints else Progress()
    wrapped.train()
    bar = tqdm(range(progress.step, steps), desc=desc, initial=progress.step, total=steps,
               leave=checkpoints is not None, disable=steps == 0 or not accelerator.is_local_main_process)
    with checkpointed_activations(model, settings.activation_checkpointing):
        for step in bar:
            started = time.perf_counter()
            batch = [rows[i] for i in order[step * settings.batch_size : (step + 1) * settings.batch_size]]
            targets = sum(target_count(row) for row in batch)
            mine = batch[rank * share : (rank + 1) * share]
            micros = [mine[i : i + settings.micro_batch_size] for i in range(0, share, settings.micro_batch_size)]
            total = 0.0
            for index, micro in enumerate(micros):
                with accelerator.no_sync(wrapped) if index < len(micros) - 1 else nullcontext():
                    loss = loss_fn(wrapped, _batch(micro, pad_id, device)) * processes / targets
                    accelerator.backward(loss)
                total += loss.item()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step = step + 1
            mean_loss = accelerator.reduce(torch.tensor(total, dtype=torch.float64, device=device), "mean")
            progress.losses.append(mean_loss.item())
            progress.step_seconds.append(round(time.perf_counter() - started, 4))
            bar.set_postfix(loss=f"{progress.losses[-1]:.4f}")
            if checkpoints and checkpoints.due(progress.step, steps):
                checkpoints.save(accelerator, progress)
    bar.close()
    model.eval()
    return progress


@contextmanager
def lora_attached(model: nn.Module, settings: LoraSettings, seed: int) -> Iterator[nn.Module]:
    """`model` wrapped with fresh LoRA adapters (the peft model) for the duration of the block; afterwards the
    adapters are removed and `model` computes exactly what it computed before (its base weights are never
    written)."""
    peft_model = attach_lora(model, settings, seed)
    try:
        yield peft_model
    finally:
        peft_model.unload()


# ---------------------------------------------------------------- recovery fine-tuning


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in name order (name, dtype, shape, raw bytes): equal digests, bitwise equal weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_dir(out: Path) -> Path:
    """Where the resumable state of a fine-tune into `out` lives (removed once `out` is written)."""
    return out.with_name(out.name + ".finetune-state")


def alpaca_rows(tokenizer, spec: str, max_length: int) -> tuple[list[Row], dict]:
    """Alpaca rows: prompt masked, EOS learned, no BOS mid-sequence; rows with no response token dropped
    (an empty output, or a response cut away by `max_length`)."""
    examples = data.load_examples(spec)
    rows = data.sft_rows(tokenizer, [e for e in examples if e.response.strip()], max_length)
    if not rows:
        raise MopError(f"{spec}: no row keeps a response token within {max_length} tokens")
    return rows, {"data": spec, "source": data.source(spec), "examples": len(examples), "rows": len(rows),
                  "dropped": len(examples) - len(rows)}


def text_rows(tokenizer, spec: str, max_length: int) -> tuple[list[Row], dict]:
    """Raw text joined and cut into `max_length`-token segments; every next token is a target."""
    texts = data.load_texts(spec)
    segments = [s.tolist() for s in data.token_segments(tokenizer, texts, max_length)]
    rows = [(ids, ids) for ids in segments if len(ids) > 1]
    return rows, {"data": spec, "source": data.source(spec), "texts": len(texts), "rows": len(rows),
                  "dropped": len(segments) - len(rows)}


def read_provenance(directory: Path) -> dict:
    """The checkpoint's mop.json, or {} for a model that mop did not write."""
    path = directory / "mop.json"
    return json.loads(path.read_text()) if path.is_file() else {}


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
               dtype: str) -> tuple[list[Row], LossFn, dict]:
    """The rows and loss of the configured method, and the record of their sources; the teacher is loaded
    on the student's device, in its dtype."""
    lora, tokenizer = config.lora, loaded.tokenizer
    if config.method == "sft":
        rows, data_record = alpaca_rows(tokenizer, config.data, lora.max_length)
        return rows, cross_entropy_sum, {"data": data_record, "teacher": None}
    reference = load_model(teacher, device, dtype)
    if reference.model.config.vocab_size != loaded.model.config.vocab_size:
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
    from mop.search import versions  # mop.search imports this module

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
    merged = peft_model.merge_and_unload()
    record = {
        "identity": identity, "method": config.method, "settings": asdict(config), **sources,
        "steps": steps, "epochs": steps * lora.batch_size / len(rows), "processes": accelerator.num_processes,
        "device": device, "dtype": dtype, "losses": progress.losses, "step_seconds": progress.step_seconds,
        "seconds": round(sum(progress.step_seconds), 3), "resumed_at": progress.resumed_at,
        # sha256 of the merged weights as each process holds them: equal entries, bitwise equal weights
        "merged_sha256": gather_object([weights_digest(dict(merged.named_parameters()))]),
        "versions": versions(),
    }
    if accelerator.is_main_process:
        save_checkpoint(loaded, merged, out, {**provenance, "finetune": record})
        shutil.rmtree(state_dir(out), ignore_errors=True)
    accelerator.wait_for_everyone()
    return record
