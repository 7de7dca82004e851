"""LoRA fine-tuning: the short tuning of MoP candidates and (through the same loop) recovery fine-tuning."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from mop.criteria import input_device
from mop.data import collate

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """The paper's recovery settings (SPEC §1); the short tuning of candidates uses the same ones."""

    rank: int = 32
    alpha: int = 10
    dropout: float = 0.05
    learning_rate: float = 3e-4
    batch_size: int = 16  # examples per optimizer step
    micro_batch_size: int = 4  # examples per forward/backward (gradient accumulation fills batch_size)
    max_length: int = 512  # tokens per example


def attach_lora(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """Wrap the seven projections with LoRA adapters (initialised from `seed`); base weights are frozen."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=list(PROJECTIONS)
    )
    return get_peft_model(model, config)


def train(model: nn.Module, rows: list[tuple[list[int], list[int]]], settings: LoraSettings, steps: int,
          pad_id: int, seed: int, desc: str = "tuning") -> list[float]:
    """`steps` AdamW steps over `rows` (cycled in a seeded order), linear decay to 0; returns the step losses
    (mean token cross-entropy, nats)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    device = input_device(model)
    torch.manual_seed(seed)  # dropout
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, leave=False, disable=steps == 0):
        picked = [rows[order[(step * settings.batch_size + i) % len(order)]] for i in range(settings.batch_size)]
        targets = sum(sum(label != -100 for label in labels[1:]) for _, labels in picked)
        total = 0.0
        for start in range(0, len(picked), settings.micro_batch_size):
            micro = picked[start : start + settings.micro_batch_size]
            batch = collate([ids for ids, _ in micro], pad_id, [labels for _, labels in micro])
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten().to(device), reduction="sum"
            ) / targets
            loss.backward()
            total += loss.item()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    model.eval()
    return losses


@contextmanager
def lora_tuned(model: nn.Module, rows, settings: LoraSettings, steps: int, pad_id: int, seed: int,
               desc: str = "tuning") -> Iterator[nn.Module]:
    """`model` with LoRA adapters trained for `steps`, for the duration of the block; afterwards the adapters
    are removed and `model` computes exactly what it computed before (its base weights are never written)."""
    peft_model = attach_lora(model, settings, seed)
    try:
        train(peft_model, rows, settings, steps, pad_id, seed, desc)
        yield model
    finally:
        peft_model.unload()
