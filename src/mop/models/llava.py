"""LLaVA (`LlavaForConditionalGeneration`): MoP prunes its language model only.

The layout in transformers 5.x: `model.model.language_model` is the decoder (a `LlamaModel`, no lm_head),
`model.lm_head` sits at the top, `model.model.vision_tower` (CLIP) and `model.model.multi_modal_projector`
beside it. The vision tower and the projector are never touched; `--target` counts the language model
(embeddings, decoder, lm_head), and the pruned widths go into `config.text_config`.
"""

from __future__ import annotations

import copy

import torch.nn as nn
from transformers import PretrainedConfig

from mop.errors import MopError
from mop.models.adapters import ADAPTERS, DecoderAdapter, LlamaAdapter

# text_config.model_type mop prunes inside a LLaVA: LLaVA-1.5's LLaMA, and the Mistral twin mop writes for it
LANGUAGE_MODELS = ("llama", "mistral")
PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's conversation format, one turn


class LlavaAdapter(LlamaAdapter):
    """LLaVA-1.5 and other `LlavaForConditionalGeneration` checkpoints with a LLaMA or Mistral language model.
    A LLaMA language model whose head count stops dividing its hidden size is written as its Mistral twin, as for
    a bare LLaMA (`LlamaAdapter`): `LlavaModel` builds any text config through `AutoModel`, with the same tensor
    names."""

    multimodal = True

    def text_config(self, model: nn.Module) -> PretrainedConfig:
        return model.config.text_config

    def backbone(self, model: nn.Module) -> nn.Module:
        kind = self.text_config(model).model_type
        if kind not in LANGUAGE_MODELS:
            raise MopError(f"LLaVA with a {kind} language model is not supported; "
                           f"supported: {', '.join(LANGUAGE_MODELS)}")
        return model.model.language_model

    def kv_head_counts(self, model: nn.Module) -> frozenset[int] | None:
        if self.text_config(model).model_type == "llama":
            return super().kv_head_counts(model)
        return None  # the Mistral twin: no biases, any head count loads

    def export_config(self, model: nn.Module) -> PretrainedConfig:
        """The LLaVA config with the pruned text config; `head_dim` is written explicitly (it no longer equals
        hidden_size / heads once heads are pruned)."""
        if self.text_config(model).model_type == "llama":
            text = super().export_config(model)  # the LLaMA rule: the Mistral twin on a non-dividing head count
        else:
            text = DecoderAdapter.export_config(self, model)
        config = copy.deepcopy(model.config)
        config.text_config = copy.deepcopy(text)
        return config

    def language_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The language model's parameters: embeddings, decoder layers, final norm and lm_head (tied ones once);
        not the vision tower's or the projector's."""
        modules = (self.backbone(model), model.get_output_embeddings())
        return list({id(p): p for m in modules for p in m.parameters()}.values())


ADAPTERS["LlavaForConditionalGeneration"] = LlavaAdapter()
