"""Models: loading (a directory, a hub id, or the embedded SmolLM2), counting, saving, and one adapter per
family (`mop.models.adapters`)."""

from mop.models.adapters import DecoderAdapter, LayerShape, adapter_for
from mop.models.loading import (DTYPES, EMBEDDED, LoadedModel, count_params, embedded_model_dir, embedding_params,
                                input_device, layer_params, load_model, release_freed_memory, save_checkpoint,
                                saved_weights_sha256, weights_sha256)

__all__ = ["DTYPES", "EMBEDDED", "DecoderAdapter", "LayerShape", "LoadedModel", "adapter_for", "count_params",
           "embedded_model_dir", "embedding_params", "input_device", "layer_params", "load_model",
           "release_freed_memory", "save_checkpoint", "saved_weights_sha256", "weights_sha256"]
