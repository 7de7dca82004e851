"""A deprecation that library code raises from inside one of our calls fails the tests (tests/conftest.py); the
same warning from a call outside `mop` stays a warning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.utils.deprecation import deprecate_kwarg

from mop.latency.protocol import greedy_generate


class DeprecatedCacheFlag(torch.nn.Module):
    """A model whose forward deprecates `use_cache` the way transformers deprecated `past_key_values`."""

    config = LlamaConfig(hidden_size=16, num_attention_heads=1, num_hidden_layers=1, vocab_size=8)

    @deprecate_kwarg("use_cache", "99.0.0")
    def forward(self, input_ids, cache=None, logits_to_keep=0, **kwargs):
        return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], input_ids.shape[1], 8))


def test_deprecated_argument_passed_by_our_code_fails():
    with pytest.raises(FutureWarning, match="`use_cache` is deprecated"):
        greedy_generate(DeprecatedCacheFlag(), torch.tensor([[1, 2]]), new_tokens=2)


def test_deprecated_argument_passed_by_other_code_only_warns():
    with pytest.warns(FutureWarning, match="`use_cache` is deprecated"):
        DeprecatedCacheFlag()(input_ids=torch.tensor([[1, 2]]), use_cache=True)
