"""Physical removal of KV groups, MLP neurons and whole decoder layers.

Every function here builds new, smaller parameters and never writes into existing ones, so a structural copy
of a model (see `structural_copy`) can be pruned while the model it was copied from stays intact.
`masked_width` computes what `prune_width` would leave without building anything: the search tunes and scores
its width candidate that way, so a candidate costs no weight memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from mop.models.adapters import DecoderAdapter


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model` (no weight memory)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared)


def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep rows (`dim=0`, output features) or columns (`dim=1`, input features) `keep` of `linear`."""
    keep = keep.to(linear.weight.device)
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(linear.weight.detach().index_select(dim, keep), requires_grad=grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, keep), requires_grad=grad)
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of heads `heads` in a projection whose output is heads × head_dim."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def keep_kv_groups(attention: nn.Module, groups: torch.Tensor, n_rep: int) -> None:
    """Keep KV groups `groups` (sorted indices) of one attention module: their key/value heads and their
    n_rep query heads (query head h belongs to group h // n_rep, as transformers' repeat_kv lays them out)."""
    head_dim = attention.head_dim
    query_heads = (groups[:, None] * n_rep + torch.arange(n_rep)).flatten()
    query_rows, kv_rows = _head_rows(query_heads, head_dim), _head_rows(groups, head_dim)
    _slice_linear(attention.q_proj, query_rows, 0)
    _slice_linear(attention.k_proj, kv_rows, 0)
    _slice_linear(attention.v_proj, kv_rows, 0)
    _slice_linear(attention.o_proj, query_rows, 1)


def keep_neurons(mlp: nn.Module, neurons: torch.Tensor) -> None:
    """Keep MLP neurons `neurons` (sorted indices): gate/up rows and down_proj columns."""
    _slice_linear(mlp.gate_proj, neurons, 0)
    _slice_linear(mlp.up_proj, neurons, 0)
    _slice_linear(mlp.down_proj, neurons, 1)


def complement(removed: list[int], size: int) -> torch.Tensor:
    """Sorted indices in range(size) that are not in `removed`."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[list(removed)] = False
    return mask.nonzero().flatten()


def prune_width(model: nn.Module, adapter: DecoderAdapter, groups: list[list[int]], neurons: list[list[int]]) -> None:
    """Remove, in every layer i, KV groups `groups[i]` and MLP neurons `neurons[i]` (indices in that layer)."""
    shape = adapter.shape(model)
    for layer, layer_groups, layer_neurons in zip(adapter.layers(model), groups, neurons, strict=True):
        if layer_groups:
            keep_kv_groups(layer.self_attn, complement(layer_groups, shape.kv_heads), shape.n_rep)
        if layer_neurons:
            keep_neurons(layer.mlp, complement(layer_neurons, shape.intermediate))
    adapter.sync_config(model)


def remove_layer(model: nn.Module, adapter: DecoderAdapter, index: int) -> None:
    """Remove decoder layer `index`; later layers are renumbered (their `layer_idx` indexes the KV cache)."""
    layers = adapter.layers(model)
    del layers[index]
    adapter.sync_config(model)


def _keep_mask(removed: list[int], size: int, repeat: int, like: torch.Tensor) -> torch.Tensor:
    """[size · repeat] of 1 (kept) and 0 (removed), each index's entry repeated `repeat` times."""
    mask = torch.ones(size, dtype=like.dtype, device=like.device)
    mask[removed] = 0
    return mask.repeat_interleave(repeat)


@contextmanager
def masked_width(model: nn.Module, adapter: DecoderAdapter, groups: list[list[int]], neurons: list[list[int]]
                 ) -> Iterator[None]:
    """For the block, `model` computes what `prune_width(model, adapter, groups, neurons)` would leave: the
    o_proj input columns of the removed groups' query heads and the down_proj inputs of the removed neurons
    are zeroed by forward pre-hooks, which is the whole contribution of those units to the residual stream.

    The hooks sit on the modules found at o_proj / down_proj when the block is entered, so entering it after
    LoRA wraps them masks the adapters' inputs too: the removed units get no gradient and add nothing."""
    shape = adapter.shape(model)
    handles = []

    def zero(mask: torch.Tensor):
        return lambda module, args: (args[0] * mask, *args[1:])

    try:
        for layer, layer_groups, layer_neurons in zip(adapter.layers(model), groups, neurons, strict=True):
            weight = next(layer.parameters())
            if layer_groups:
                heads = _keep_mask(layer_groups, shape.kv_heads, shape.n_rep * shape.head_dim, weight)
                handles.append(layer.self_attn.o_proj.register_forward_pre_hook(zero(heads)))
            if layer_neurons:
                kept = _keep_mask(layer_neurons, shape.intermediate, 1, weight)
                handles.append(layer.mlp.down_proj.register_forward_pre_hook(zero(kept)))
        yield
    finally:
        for handle in handles:
            handle.remove()
