"""Serving checks: does a checkpoint run in a serving engine exactly as in transformers (`vllm_check`)."""
