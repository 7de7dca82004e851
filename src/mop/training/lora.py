"""LoRA adapters on the seven projections of every decoder layer, with the paper's settings (SPEC §1)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def attach_lora(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """Wrap the seven projections with LoRA adapters (initialised from `seed`); base weights are frozen."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=list(PROJECTIONS)
    )
    return get_peft_model(model, config)


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
