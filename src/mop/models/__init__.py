"""Models: loading (a directory, a hub id, or the embedded SmolLM2), counting, saving, and one adapter per
family (`mop.models.adapters`; LLaVA in `mop.models.llava`)."""

from mop.models.adapters import DecoderAdapter, LayerShape, adapter_for
from mop.models.loading import (DTYPES, EMBEDDED, LoadedModel, count_all_params, count_params, embedded_model_dir,
                                embedding_params, input_device, layer_params, load_model, model_adapter,
                                release_freed_memory, save_checkpoint, saved_weights_sha256, weights_sha256)
from mop.models import llava  # noqa: E402,F401  (registers the LLaVA adapter)

__all__ = ["DTYPES", "EMBEDDED", "DecoderAdapter", "LayerShape", "LoadedModel", "adapter_for", "count_all_params",
           "count_params", "embedded_model_dir", "embedding_params", "input_device", "layer_params", "load_model",
           "model_adapter", "release_freed_memory", "save_checkpoint", "saved_weights_sha256", "weights_sha256"]
