"""One training loop, built on `accelerate`, for the short tuning of MoP candidates (LoRA) and for recovery
fine-tuning (LoRA or every weight): `accelerate launch` runs it on several processes (DDP) with no code change;
on one process it is a plain PyTorch loop."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from accelerate import Accelerator
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from mop import data
from mop.errors import MopError
from mop.models import input_device
from mop.training.checkpoints import Checkpoints, Progress
from mop.training.losses import LossFn, cross_entropy_sum, target_count
from mop.training.lora import LoraSettings


def row_order(n: int, count: int, seed: int) -> list[int]:
    """The first `count` indices of a seeded stream of epochs, each a fresh permutation of range(n)."""
    generator, order = random.Random(seed), []
    while len(order) < count:
        epoch = list(range(n))
        generator.shuffle(epoch)
        order += epoch
    return order[:count]


def _batch(rows: list[data.Row], pad_id: int, device: torch.device) -> data.Batch:
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


def train(model: nn.Module, rows: list[data.Row], settings: LoraSettings, steps: int, seed: int, pad_id: int,
          loss_fn: LossFn = cross_entropy_sum, accelerator: Accelerator | None = None,
          checkpoints: Checkpoints | None = None, desc: str = "tuning") -> Progress:
    """`steps` AdamW steps of `settings.batch_size` rows each, linear decay to 0, on the trainable
    parameters of `model` (its LoRA adapters, or every weight of its language model).

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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
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
