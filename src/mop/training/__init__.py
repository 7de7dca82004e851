"""LoRA training: adapters (`lora`), losses, the loop, resumable state, and recovery fine-tuning."""

from mop.training.lora import LoraSettings, attach_lora, lora_attached
from mop.training.loop import train
from mop.training.recovery import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "LoraSettings", "attach_lora", "finetune", "lora_attached", "train"]
