"""Latency: the paper's protocol in transformers (`protocol`), the same protocol in vLLM (`vllm_bench`), and a
latency model of the device fitted on timed synthetic shapes (`model`)."""

from mop.latency.model import (LatencyModel, ModelShape, UnitLatency, checkpoint_shape, fit_latency_model,
                               measure_latency_model, model_shape)
from mop.latency.protocol import LatencySettings, benchmark, measure, source_baseline, source_of, summary_table

__all__ = ["LatencyModel", "LatencySettings", "ModelShape", "UnitLatency", "benchmark", "checkpoint_shape",
           "fit_latency_model", "measure", "measure_latency_model", "model_shape", "source_baseline", "source_of",
           "summary_table"]
