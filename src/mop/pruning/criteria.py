"""Scoring criteria behind three registries: layer (which layer a depth step removes), width (how important
each attention unit and MLP neuron is) and path (how far a candidate is from the original model).

Add a criterion by decorating a function; the MoP loop looks criteria up by name only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mop.data import Batch
from mop.evaluation.perplexity import segments_perplexity
from mop.models import DecoderAdapter, input_device
from mop.pruning.compensation import DEFAULT_DEPTH_RIDGE, DEFAULT_RIDGE, depth_repair_errors, width_elimination_orders

LAYER_CRITERIA: dict[str, Callable[[nn.Module, DecoderAdapter, list[Batch]], int]] = {}
WIDTH_CRITERIA: dict[str, Callable[..., list["UnitScores"]]] = {}
# width criteria that read the Grams of the width repair (called with `moments=`, see `width_criterion`)
WIDTH_CRITERIA_READING_MOMENTS: set[str] = set()
PATH_CRITERIA: dict[str, "PathCriterion"] = {}
CHUNK_ELEMENTS = 1 << 20  # bound on the temporary tensors of a scoring hook (elements)


def layer_criterion(name: str):
    def register(fn):
        LAYER_CRITERIA[name] = fn
        return fn

    return register


def width_criterion(name: str, reads_moments: bool = False):
    """Register fn(model, adapter, batches) → [UnitScores per layer]. With `reads_moments`, fn also takes
    `moments=`: the recording of the width repair's input Grams (`recorded_width_moments`) open around the call,
    which the criterion's own pass fills and which the repair then reuses (empty: fn reads the Grams itself)."""
    def register(fn):
        WIDTH_CRITERIA[name] = fn
        if reads_moments:
            WIDTH_CRITERIA_READING_MOMENTS.add(name)
        return fn

    return register


def _forward(model: nn.Module, batch: Batch) -> None:
    """A forward pass for the hooks' sake: only the last position's logits are computed, and no KV cache is
    kept (it would hold every layer's keys and values until the pass ends)."""
    device = input_device(model)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)


# ---------------------------------------------------------------- layer criteria


@layer_criterion("third_to_last")
def third_to_last(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch]) -> int:
    """The paper's L: index n_layers − 3, so the last two layers always stay."""
    return len(adapter.layers(model)) - 3


@layer_criterion("block_influence")
def block_influence(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch]) -> int:
    """The layer whose output is closest to its input (lowest `block_influences`); the last two layers are
    never chosen."""
    influences = block_influences(model, adapter, batches)
    return int(influences[: max(len(influences) - 2, 1)].argmin())


@layer_criterion("repair_error")
def repair_error(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch]) -> int:
    """The layer whose removal the closed-form depth repair restores best: the lowest relative error left after
    the re-fit (`depth_repair_errors`, at the default depth ridge), where block influence ranks the plain cut.
    The last two layers are never chosen. Meant with `--compensation lstsq` (the search refuses it without)."""
    errors = depth_repair_errors(model, adapter, batches, DEFAULT_DEPTH_RIDGE)
    return int(errors[: max(len(errors) - 2, 1)].argmin())


@torch.no_grad()
def block_influences(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch]) -> torch.Tensor:
    """Per layer, 1 − cos(x_in, x_out) between its input and output hidden states, averaged over the real
    tokens of each prompt, then over prompts: [n_layers] float64."""
    layers = adapter.layers(model)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    mask: list[torch.Tensor] = []

    def hook(index):
        def record(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            m = mask[0].to(x_in.device, torch.float32)
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [B, T]
            per_prompt = ((1 - cos) * m).sum(1) / m.sum(1)
            totals[index] += per_prompt.sum().item()

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    prompts = 0
    try:
        for batch in batches:
            mask[:] = [batch.attention_mask]
            _forward(model, batch)
            prompts += batch.input_ids.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return totals / prompts


# ---------------------------------------------------------------- width criteria


@dataclass
class UnitScores:
    """Importance of one layer's units (higher = more important)."""

    groups: torch.Tensor  # [kv_heads] float64
    neurons: torch.Tensor  # [intermediate] float64


@width_criterion("amp")
@torch.no_grad()
def amp(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch]) -> list[UnitScores]:
    """AMP (Mugnaini et al. 2025), one pass over the calibration batches with forward pre-hooks.

    Head h: mean over a prompt's real tokens of ‖W_o[:, h] z_t^(h)‖₁, its contribution to the residual stream;
    a KV group scores the mean of its query heads. Neuron j: mean of |SiLU(gate_j(x))·up_j(x)|, the down_proj
    input. Both are averaged per prompt, then over prompts. The hooks see real tokens only (padding is dropped,
    not masked), each weighted by 1 / its prompt's length; the head contributions are formed a chunk of tokens
    at a time, so memory stays under CHUNK_ELEMENTS whatever the sequence length.
    """
    shape = adapter.shape(model)
    layers = adapter.layers(model)
    heads = torch.zeros(len(layers), shape.heads, dtype=torch.float64)
    neurons = torch.zeros(len(layers), shape.intermediate, dtype=torch.float64)
    state: dict[str, torch.Tensor] = {}

    def head_hook(index: int, o_proj: nn.Linear):
        def record(module, args):
            z = args[0][state["real"].to(args[0].device)]  # [N, H·d_h], the o_proj input at real tokens
            weight = state["token_weight"].to(z.device)  # [N]
            w = o_proj.weight.view(shape.hidden, shape.heads, shape.head_dim).permute(1, 2, 0)  # [H, d_h, d]
            sums = torch.zeros(shape.heads, device=z.device, dtype=torch.float32)
            step = max(1, CHUNK_ELEMENTS // (shape.heads * shape.hidden))
            for start in range(0, len(z), step):
                zc = z[start : start + step].view(-1, shape.heads, shape.head_dim).transpose(0, 1)  # [H, n, d_h]
                # abs_ then sum: on the CPU, ~2.6x faster than linalg.vector_norm(ord=1) on the same [H, n, d]
                l1 = torch.bmm(zc, w).abs_().sum(-1, dtype=torch.float32)  # [H, n]
                sums += l1 @ weight[start : start + step]
            heads[index] += sums.double().cpu()

        return record

    def neuron_hook(index: int):
        def record(module, args):
            x = args[0][state["real"].to(args[0].device)]  # [N, intermediate], SiLU(gate(x)) * up(x)
            neurons[index] += (state["token_weight"].to(x.device) @ x.abs().float()).double().cpu()

        return record

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i, layer.self_attn.o_proj)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(neuron_hook(i)))
    prompts = 0
    try:
        for batch in batches:
            real = batch.attention_mask.bool()  # [B, T]
            state["real"] = real
            state["token_weight"] = (1 / real.sum(1, keepdim=True).float()).expand(real.shape)[real]  # [N]
            _forward(model, batch)
            prompts += batch.input_ids.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    heads, neurons = heads / prompts, neurons / prompts
    groups = heads.view(len(layers), shape.kv_heads, shape.n_rep).mean(-1)
    return [UnitScores(groups[i], neurons[i]) for i in range(len(layers))]


@width_criterion("repair_error", reads_moments=True)
@torch.no_grad()
def repair_order(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], moments: dict | None = None
                 ) -> list[UnitScores]:
    """Units ranked by what the closed-form width repair leaves, where AMP ranks them by their plain contribution:
    per layer, the order in which greedy elimination with least-squares re-fit of what remains removes KV groups
    from o_proj's input and neurons from down_proj's (`width_elimination_orders`, at the default width ridge).
    A unit the others can stand in for goes first, however large its own output. Meant with `--compensation
    lstsq` (the search refuses it without)."""
    if moments:  # an open recording: this pass fills it
        for batch in batches:
            _forward(model, batch)
    orders = width_elimination_orders(model, adapter, batches, moments, DEFAULT_RIDGE)
    return [UnitScores(groups, neurons) for groups, neurons in orders]


# ---------------------------------------------------------------- path criteria


@dataclass
class PathReference:
    """What path criteria compare a candidate with, computed once per run from the original model F."""

    batches: list[Batch] = field(default_factory=list)  # path texts (cosine, kl)
    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch: F's lm_head input at real tokens [N, d]
    # [V, d], F's own tensor, not a copy: surgery keeps the hidden size and builds new tensors rather than
    # writing into old ones, and LoRA leaves lm_head alone, so it never changes during a search
    lm_head_weight: torch.Tensor | None = None
    lm_head_bias: torch.Tensor | None = None  # [V] or None
    segments: list[torch.Tensor] = field(default_factory=list)  # perplexity segments, token ids [T]


@dataclass(frozen=True)
class PathCriterion:
    """`score(candidate, adapter, reference)` → float, lower = closer to F. `score=None` means the criterion
    decides without looking at the candidates (random), so they are neither tuned nor scored."""

    score: Callable[[nn.Module, DecoderAdapter, PathReference], float] | None
    needs: str  # which part of PathReference it reads: "logits", "segments" or "nothing"


def path_criterion(name: str, needs: str):
    def register(fn):
        PATH_CRITERIA[name] = PathCriterion(fn, needs)
        return fn

    return register


PATH_CRITERIA["random"] = PathCriterion(None, "nothing")


def coin(seed: int, iteration: int) -> str:
    """The random path criterion: a fair coin drawn from the run's seed and the iteration, 'W' or 'D'."""
    return random.Random(f"mop-path-{seed}-{iteration}").choice("WD")


@torch.no_grad()
def final_hidden(model: nn.Module, adapter: DecoderAdapter, batch: Batch) -> torch.Tensor:
    """The lm_head input at the batch's real tokens, [N, d]."""
    device = input_device(model)
    mask = batch.attention_mask.to(device)
    hidden = adapter.backbone(model)(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False)
    hidden = hidden.last_hidden_state
    return hidden[mask.bool()]


@torch.no_grad()
def build_reference(model: nn.Module, adapter: DecoderAdapter, batches: list[Batch], segments) -> PathReference:
    head = adapter.text_model(model).get_output_embeddings()
    bias = None if head.bias is None else head.bias.detach()
    hidden = [final_hidden(model, adapter, batch).cpu() for batch in batches]
    return PathReference(batches, hidden, head.weight.detach(), bias, segments)


def _logit_pairs(model: nn.Module, adapter: DecoderAdapter, reference: PathReference, chunk: int = 128):
    """Yield (reference logits, candidate logits), float32 [n, V], a chunk of positions at a time (a few
    [chunk, V] temporaries are all the memory a path score needs beyond the model)."""
    head = adapter.text_model(model).get_output_embeddings()
    for batch, ref_hidden in zip(reference.batches, reference.hidden, strict=True):
        hidden = final_hidden(model, adapter, batch)
        for start in range(0, len(hidden), chunk):
            h = hidden[start : start + chunk]
            r = ref_hidden[start : start + chunk].to(h.device, reference.lm_head_weight.dtype)
            ref_bias = None if reference.lm_head_bias is None else reference.lm_head_bias.to(h.device)
            yield F.linear(r, reference.lm_head_weight.to(h.device), ref_bias).float(), head(h).float()


@path_criterion("cosine", needs="logits")
@torch.no_grad()
def cosine_angle(model: nn.Module, adapter: DecoderAdapter, reference: PathReference) -> float:
    """arccos of the cosine between F's and the candidate's logits, flattened over all positions (radians)."""
    dot = ref_sq = cand_sq = 0.0
    for ref, cand in _logit_pairs(model, adapter, reference):
        dot += (ref.double() * cand.double()).sum().item()
        ref_sq += ref.double().square().sum().item()
        cand_sq += cand.double().square().sum().item()
    return math.acos(max(-1.0, min(1.0, dot / math.sqrt(ref_sq * cand_sq))))


@path_criterion("kl", needs="logits")
@torch.no_grad()
def kl_divergence(model: nn.Module, adapter: DecoderAdapter, reference: PathReference) -> float:
    """KL(p_F ‖ q_candidate) over the vocabulary, averaged over positions (nats)."""
    total, positions = 0.0, 0
    for ref, cand in _logit_pairs(model, adapter, reference):
        positions += len(ref)
        log_p = F.log_softmax(ref, -1)
        del ref
        log_q = F.log_softmax(cand, -1)
        del cand
        total += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
    return total / positions


@path_criterion("ppl", needs="segments")
def perplexity(model: nn.Module, adapter: DecoderAdapter, reference: PathReference) -> float:
    """Perplexity of the candidate on the calibration segments (WikiText-2 test, 2048 tokens each)."""
    return segments_perplexity(model, reference.segments)
