"""LoRA adapters on the seven projections of every decoder layer, with the paper's settings (SPEC §1): attached
for a block (the candidates' short tuning) or merged into the weights (recovery)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

from mop.errors import MopError
from mop.models import adapter_for

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """The paper's recovery settings (SPEC §1); the short tuning of candidates uses the same ones."""

    rank: int = 32
    alpha: int = 10
    dropout: float = 0.05
    learning_rate: float = 3e-4
    # AdamW's decoupled weight decay: torch's default, which every run before the option used; the reference
    # recipe (LLM-Pruner's and MoP's Alpaca LoRA) uses 0 (docs/design.md, "Recovery")
    weight_decay: float = 0.01
    batch_size: int = 16  # examples per optimizer step, over all processes
    micro_batch_size: int = 4  # examples per forward/backward (gradient accumulation fills batch_size)
    max_length: int = 512  # tokens per example
    # recompute each decoder layer's activations in the backward pass: with frozen base weights the backward
    # is about one forward, so a step costs ~1.5x the compute (1.75x measured, docs/benchmarks/finetune.md), and
    # the activations of one layer are held at a time instead of all of them (~0.5x the peak memory)
    activation_checkpointing: bool = True

    def validate(self) -> None:
        positive = {"batch size": self.batch_size, "micro batch size": self.micro_batch_size,
                    "max length": self.max_length, "rank": self.rank, "learning rate": self.learning_rate}
        for name, value in positive.items():
            if value <= 0:
                raise MopError(f"LoRA {name} must be positive, not {value}")
        if not 0 <= self.dropout < 1:
            raise MopError(f"LoRA dropout must be in [0, 1), not {self.dropout}")
        if not 0 <= self.weight_decay < math.inf:
            raise MopError(f"weight decay must be a number >= 0, not {self.weight_decay}")

    def identity(self) -> dict:
        """The settings as a run's identity: the default weight decay is left out, so runs made before it was
        an option keep theirs."""
        return {k: v for k, v in asdict(self).items() if not (k == "weight_decay" and v == 0.01)}


def attach_lora(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """Wrap the seven projections with LoRA adapters (initialised from `seed`); base weights are frozen."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=target_modules(model)
    )
    return get_peft_model(model, config)


def target_modules(model: nn.Module) -> str:
    """The seven projections of the decoder layers, as a regex peft matches against full module names: only the
    language model's, as a VLM's vision tower has q_proj/k_proj/v_proj too."""
    layers = adapter_for(model).layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)  # "model.layers", ...
    return rf"{re.escape(prefix)}\.\d+\.(self_attn|mlp)\.({'|'.join(PROJECTIONS)})"


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


def merge_lora(peft_model: PeftModel) -> nn.Module:
    """The base model with the adapters folded into its weights, in fp32 and rounded once to the weights' dtype:
    W ← (W.float() + scale · B.float() @ A.float()).to(W.dtype), W [out, in], A [r, in], B [out, r].

    peft's own merge rounds the delta to the weights' dtype before adding it, so a bf16 weight is rounded twice
    and small deltas drift; here each merged weight is the bf16 value nearest to the exact sum."""
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLinear):
                weight = module.get_base_layer().weight
                merged = weight.float()
                for name in module.active_adapters:
                    delta = module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()
                    merged = merged + module.scaling[name] * delta
                weight.copy_(merged)
    return peft_model.unload()
