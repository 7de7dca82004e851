"""Fixtures: tiny random models of every supported family (saved as plain checkpoint directories with a tiny
BPE tokenizer trained on WikiText-2), MOP_DATA_DIR pointing at ../shared/data, and the hub switched off."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("MOP_DATA_DIR", str(SHARED_DATA))
# before transformers / huggingface_hub / datasets are imported: they read these once, at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config  # noqa: E402

VOCAB = 512  # the tiny test tokenizer's
TINY = {
    # MHA, 6 heads of 16 on d=96: pruning one head leaves 5, which does not divide 96 (exported as Mistral)
    "llama-mha": lambda: LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, head_dim=16,
                                     intermediate_size=128, num_hidden_layers=6, tie_word_embeddings=False),
    # GQA with tied embeddings, like SmolLM2
    "llama-gqa": lambda: LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     intermediate_size=96, num_hidden_layers=6, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     intermediate_size=96, num_hidden_layers=6, sliding_window=None),
    # q/k/v biases
    "qwen2": lambda: Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=96, num_hidden_layers=6, tie_word_embeddings=True),
}


def _package(frame) -> str:
    return frame.f_globals.get("__name__", "").partition(".")[0]


@pytest.fixture(autouse=True)
def deprecations_from_our_calls_fail(monkeypatch):
    """A DeprecationWarning or FutureWarning about a call that `mop` makes is an error. pyproject.toml's
    `error::FutureWarning:mop` sees only warnings attributed to our modules; transformers' `deprecate_kwarg`
    warns from inside a model's forward, which Python attributes to torch's `Module.__call__`. So the caller is
    found here: the first frame outside the warning library and torch (which dispatches forward calls). A
    deprecation that another library's call raises (peft calling transformers) stays a warning."""
    library_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = type(message) if isinstance(message, Warning) else category or UserWarning
        if issubclass(kind, (DeprecationWarning, FutureWarning)):
            frame = sys._getframe(1)
            library = _package(frame)
            while frame is not None and _package(frame) in (library, "torch"):
                frame = frame.f_back
            if frame is not None and _package(frame) == "mop":
                raise message if isinstance(message, Warning) else kind(message)
        return library_warn(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    return random_model(TINY[family](), seed)


def random_model(config, seed: int = 0) -> torch.nn.Module:
    """A random model of `config` with the tiny tokenizer's vocabulary and special ids, biases drawn too."""
    config.vocab_size = VOCAB
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 2, 1, 2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases, so that slicing them is tested
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from mop.models import embedded_model_dir

    return embedded_model_dir("smollm2-135m")


def train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token byte-level BPE trained on WikiText-2 test, with <s> prepended like LLaMA's tokenizer."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = (SHARED_DATA / "wikitext2" / "wiki.test.raw").read_text().splitlines()[:2000]
    bpe.train_from_iterator(lines, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Each tiny family saved once as a checkpoint directory."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for family in TINY:
        model = tiny_model(family)
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture(params=sorted(TINY))
def family(request) -> str:
    return request.param
