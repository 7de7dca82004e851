"""Losses of a batch of rows (`mop.data.Row`): supervised next-token cross-entropy on target tokens, and
distillation from a teacher's distributions."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mop import data

LossFn = Callable[[nn.Module, data.Batch], torch.Tensor]  # summed over the batch's target positions (nats)


def target_count(row: data.Row) -> int:
    """Positions of `row` that enter the loss: those whose next token is a target."""
    return sum(label != data.IGNORE for label in row[1][1:])


def target_logits(model: nn.Module, batch: data.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is a target, float32 [N, V], and those targets [N].

    Only these N rows are kept (and, in training, given a gradient): the [B, T, V] logits are freed at once."""
    is_target = batch.labels[:, 1:] != data.IGNORE  # [B, T-1]
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
