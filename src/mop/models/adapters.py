"""One adapter per model family: where the decoder layers live and how a pruned config is written.

Everything else in `mop` talks to a model through its adapter, so a new family is one subclass here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from transformers import MistralConfig, PretrainedConfig

from mop.errors import MopError


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer (all layers share them: MoP prunes uniformly)."""

    hidden: int  # d, the residual width
    head_dim: int  # d_h
    kv_heads: int  # number of KV groups (= attention units we prune)
    n_rep: int  # query heads per KV group (1 for MHA)
    intermediate: int  # MLP neurons
    qkv_bias: bool
    mlp_bias: bool

    @property
    def heads(self) -> int:
        return self.kv_heads * self.n_rep

    @property
    def group_params(self) -> int:
        """Parameters of one KV group: n_rep query heads + 1 key + 1 value head + n_rep o_proj slices."""
        weights = 2 * self.n_rep * self.hidden * self.head_dim + 2 * self.hidden * self.head_dim
        return weights + (self.n_rep + 2) * self.head_dim * self.qkv_bias

    @property
    def neuron_params(self) -> int:
        """Parameters of one MLP neuron: a gate row, an up row and a down column (+ their biases)."""
        return 3 * self.hidden + 2 * self.mlp_bias

    @property
    def attention_params(self) -> int:
        return self.kv_heads * self.group_params

    @property
    def mlp_params(self) -> int:
        return self.intermediate * self.neuron_params


class DecoderAdapter:
    """LLaMA-style decoder: `model.model.layers[i].self_attn.{q,k,v,o}_proj` and `.mlp.{gate,up,down}_proj`."""

    multimodal = False  # a vision-language model: a processor to load and save, parts beside the language model

    def text_model(self, model: nn.Module) -> nn.Module:
        """The causal LM that holds the decoder (the model itself, or the language model of a VLM)."""
        return model

    def text_config(self, model: nn.Module) -> PretrainedConfig:
        return model.config

    def backbone(self, model: nn.Module) -> nn.Module:
        """Embeddings + decoder layers + final norm; its output is the lm_head input."""
        return self.text_model(model).model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).layers

    def shape(self, model: nn.Module) -> LayerShape:
        layer = self.layers(model)[0]
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = attn.head_dim
        kv_heads = attn.k_proj.out_features // head_dim
        return LayerShape(
            hidden=attn.q_proj.in_features,
            head_dim=head_dim,
            kv_heads=kv_heads,
            n_rep=attn.q_proj.out_features // head_dim // kv_heads,
            intermediate=mlp.gate_proj.out_features,
            qkv_bias=attn.q_proj.bias is not None,
            mlp_bias=mlp.gate_proj.bias is not None,
        )

    def sync_config(self, model: nn.Module) -> None:
        """Write the current module shapes into the in-memory config, so forward and cache agree with them."""
        config, layers = self.text_config(model), self.layers(model)
        shape = self.shape(model)
        config.num_hidden_layers = len(layers)
        config.num_attention_heads = shape.heads
        config.num_key_value_heads = shape.kv_heads
        config.intermediate_size = shape.intermediate
        config.head_dim = shape.head_dim
        for index, layer in enumerate(layers):
            layer.self_attn.layer_idx = index

    def export_config(self, model: nn.Module) -> PretrainedConfig:
        """The config to save: loadable by plain `AutoModelForCausalLM.from_pretrained`."""
        self.sync_config(model)
        return self.text_config(model)

    def kv_head_counts(self, model: nn.Module) -> frozenset[int] | None:
        """The KV-group counts a pruned layer may keep and still be exported (None: any count)."""
        return None

    def language_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters of the language model (embeddings, decoder layers, final norm, lm_head; tied ones once):
        what `--target` compresses and what full-parameter recovery trains. For a causal LM, every parameter."""
        return list(model.parameters())

    def language_params(self, model: nn.Module) -> int:
        """P(F): the number of `language_parameters`."""
        return sum(p.numel() for p in self.language_parameters(model))


class LlamaAdapter(DecoderAdapter):
    """LLaMA-1/2/3, SmolLM, TinyLlama.

    transformers' `LlamaConfig` refuses `hidden_size % num_attention_heads != 0`, even with `head_dim` set.
    A bias-free LLaMA computes exactly what `MistralForCausalLM` computes when Mistral's sliding window is
    off, and Mistral's config has no such check, so those checkpoints are written as Mistral (same tensor
    names, same weights). A LLaMA with biases has no such twin: its head count must keep dividing hidden_size,
    and the width planner only leaves such counts (`kv_head_counts`).
    """

    def kv_head_counts(self, model: nn.Module) -> frozenset[int] | None:
        config = self.text_config(model)
        if not (config.attention_bias or config.mlp_bias):
            return None
        shape = self.shape(model)
        return frozenset(k for k in range(1, shape.kv_heads + 1) if shape.hidden % (k * shape.n_rep) == 0)

    def export_config(self, model: nn.Module) -> PretrainedConfig:
        config = super().export_config(model)
        if config.hidden_size % config.num_attention_heads == 0:
            return config
        if config.attention_bias or config.mlp_bias:
            raise MopError(
                f"{config.num_attention_heads} heads do not divide hidden_size {config.hidden_size}, and a LLaMA "
                "with biases has no loadable equivalent in transformers; prune with --mode depth or another target"
            )
        fields = {k: v for k, v in config.to_dict().items() if k in MistralConfig.__dataclass_fields__}
        fields.update(sliding_window=None, architectures=["MistralForCausalLM"])
        fields.pop("model_type", None)
        return MistralConfig(**fields)


class MistralAdapter(DecoderAdapter):
    """Mistral (GQA, no biases, optional sliding window)."""


class Qwen2Adapter(DecoderAdapter):
    """Qwen2/2.5: q/k/v biases (sliced with their weights), a per-layer `layer_types` list and
    `max_window_layers` (layers below it use full attention, those from it on the sliding window)."""

    def sync_config(self, model: nn.Module) -> None:
        config = self.text_config(model)
        kept = {layer.self_attn.layer_idx for layer in self.layers(model)}  # indices as the config last knew them
        removed = set(range(config.num_hidden_layers)) - kept
        config.max_window_layers -= sum(index < config.max_window_layers for index in removed)
        super().sync_config(model)
        config = self.text_config(model)
        config.layer_types = [layer.self_attn.layer_type for layer in self.layers(model)]


ADAPTERS: dict[str, DecoderAdapter] = {
    "LlamaForCausalLM": LlamaAdapter(),
    "MistralForCausalLM": MistralAdapter(),
    "Qwen2ForCausalLM": Qwen2Adapter(),
}


def adapter_for(model: nn.Module) -> DecoderAdapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise MopError(f"unsupported architecture {name}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]


def check_architecture(config: PretrainedConfig) -> str:
    """The supported architecture a config names; fails before any weight is loaded if there is none."""
    names = config.architectures or []
    for name in names:
        if name in ADAPTERS:
            return name
    found = ", ".join(names) or config.model_type
    raise MopError(f"unsupported architecture {found}; supported: {', '.join(sorted(ADAPTERS))}")
