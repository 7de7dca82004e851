"""Perplexity by the protocol pruning papers report (LLM-Pruner, SliceGPT, Wanda, ShortGPT, MoP): the WikiText-2
test split as `"\n\n".join(rows)` over all 4,358 rows of `wikitext-2-raw-v1` (blank rows included), tokenized
once, cut into `numel // L` consecutive segments of L = 2048 tokens (the tail is dropped), each scored on its
own with no context from the previous one; perplexity = exp(total next-token NLL / tokens predicted), where each
segment predicts its L − 1 tokens after the first."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mop.data import perplexity_text, text_segments
from mop.evaluation.tasks import PERPLEXITY_TASK
from mop.models import LoadedModel, input_device

PROTOCOL = ('"\\n\\n".join(rows) over every row of the wikitext-2-raw-v1 test split (blank rows included), '
            "tokenized once, numel // L consecutive L-token segments (tail dropped), each scored alone; "
            "perplexity = exp(sum of next-token NLL / tokens predicted), L - 1 predicted tokens per segment")


@torch.no_grad()
def segments_perplexity(model: nn.Module, segments: list[torch.Tensor], label: str | None = None) -> float:
    """exp(mean next-token NLL) over token segments ([T] ids each, scored independently); with `label`, a
    progress bar of the segments under that label."""
    device = input_device(model)
    nll, tokens = 0.0, 0
    for segment in tqdm(segments, desc=label, unit="segment", disable=label is None):
        ids = segment[None].to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        nll += loss.item() * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    return math.exp(nll / tokens)


def perplexity(loaded: LoadedModel, data: str, segment_length: int, limit: int | None,
               wikitext: bool = False) -> dict:
    """Token perplexity of `data` (`wikitext2`, or with `wikitext` a file of a WikiText split: the standard
    protocol above); `limit` keeps the first `limit` segments (all of them when None)."""
    wikitext = wikitext or data == "wikitext2"
    segments = text_segments(loaded.tokenizer, perplexity_text(data, wikitext), segment_length, limit)
    return {"perplexity": segments_perplexity(loaded.model, segments, f"evaluate {PERPLEXITY_TASK}"),
            "segments": len(segments),
            "segment_length": segment_length, "tokens_scored": sum(len(s) - 1 for s in segments), "data": data,
            "protocol": PROTOCOL if wikitext else "texts joined by blank lines; " + PROTOCOL.split("; ", 1)[1]}
