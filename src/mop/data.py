"""Data: named sets (wikitext2, alpaca, c4) or local files, resolved as SPEC §3 says, and tokenized batches.

Resolution order for a name: the directory in `MOP_DATA_DIR` → the Hugging Face hub (when `datasets` is
installed and the hub is reachable) → the caller's fallback (text sampled from the model, with a warning).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mop.errors import MopError

log = logging.getLogger(__name__)

# name -> (file under MOP_DATA_DIR, hub loader arguments)
NAMED = {
    "wikitext2": ("wikitext2/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test")),
    # calibration text that is not the test split perplexity is measured on (the local copy is the tokenized
    # wikitext-2-v1 validation file, with <unk>; no raw validation file was found)
    "wikitext2-valid": ("wikitext2/valid.txt", ("wikitext", "wikitext-2-raw-v1", "validation")),
    "alpaca": ("alpaca/alpaca_en_demo.json", ("yahma/alpaca-cleaned", None, "train")),
    "c4": ("c4/c4_demo.jsonl", ("allenai/c4", "en", "validation")),
}
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


IGNORE = -100  # label of a position that is not learned (prompt, padding)
Row = tuple[list[int], list[int]]  # (input_ids, labels): labels[t] = IGNORE where token t is not a target


class DataUnavailable(MopError):
    """A named data set is neither under MOP_DATA_DIR nor on a reachable hub."""


@dataclass(frozen=True)
class Example:
    """One training row: `prompt` is masked out of the loss, `response` is learned."""

    prompt: str
    response: str


def alpaca_prompt(record: dict) -> str:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def _read_file(path: Path) -> list:
    """Rows of a .json (a list), .jsonl (one object a line) or text file (one row a line)."""
    try:
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list):
                raise MopError(f"{path}: expected a JSON list of records")
            return rows
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return path.read_text().splitlines()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MopError(f"{path} cannot be parsed: {error}") from None


def _from_hub(name: str) -> list | None:
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return None
    try:
        import datasets
    except ImportError:
        return None
    repo, config, split = NAMED[name][1]
    try:
        rows = datasets.load_dataset(repo, config, split=split, streaming=name == "c4")
        return list(rows.take(5000)) if name == "c4" else list(rows)
    except Exception as error:  # unreachable hub, missing repo
        log.warning("%s: hub unavailable (%s)", name, type(error).__name__)
        return None


def local_path(spec: str) -> Path | None:
    """The file a data spec reads: the path itself, or the named set under MOP_DATA_DIR; None for the hub."""
    path = Path(spec)
    if path.is_file():
        return path
    if spec not in NAMED:
        raise MopError(f"data {spec} not found: not a file, nor one of {', '.join(NAMED)}")
    data_dir = os.environ.get("MOP_DATA_DIR")
    if data_dir and (Path(data_dir) / NAMED[spec][0]).is_file():
        return Path(data_dir) / NAMED[spec][0]
    return None


def source(spec: str) -> str:
    """Where a data spec's rows come from (a file, or the hub dataset), without reading them."""
    path = local_path(spec)
    return str(path) if path is not None else f"hub:{NAMED[spec][1][0]}"


def load_rows(spec: str) -> tuple[list, str]:
    """Rows of a named set or a file path, and where they came from."""
    path = local_path(spec)
    if path is not None:
        return _read_file(path), str(path)
    rows = _from_hub(spec)
    if rows is None:
        data_dir = os.environ.get("MOP_DATA_DIR")
        raise DataUnavailable(f"{spec}: not under MOP_DATA_DIR ({data_dir or 'unset'}) and the hub is unreachable")
    return rows, source(spec)


def _text_of(row, source: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, dict) and isinstance(row.get("instruction"), str):
        return alpaca_prompt(row) + str(row.get("output", ""))
    raise MopError(f"{source}: rows need a 'text' field or Alpaca fields (instruction, input, output)")


def load_texts(spec: str) -> list[str]:
    """Non-empty texts of a data set (WikiText rows, C4 documents, Alpaca rows as prompt + response)."""
    rows, source = load_rows(spec)
    texts = [text for row in rows if (text := _text_of(row, source)).strip()]
    if not texts:
        raise MopError(f"{source} holds no non-empty text")
    return texts


def wikitext_rows(raw: str) -> list[str]:
    """The rows of Hugging Face's `wikitext-2-raw-v1` split from its `wiki.*.raw` file: one row a line, each
    non-empty row with its trailing newline, each blank (whitespace-only) line an empty row."""
    return [line + "\n" if line.strip() else "" for line in raw.removesuffix("\n").split("\n")]


def wikitext_file_rows(path: Path) -> list[str]:
    """The rows of a WikiText split in a local file: a `wiki.*.raw` text file (`wikitext_rows`) or the Hugging
    Face rows as .json / .jsonl records with a `text` field, blank rows kept. A file with no blank row is not a
    WikiText split (blank rows set off every heading and paragraph), so the standard protocol cannot be followed
    on it: refused."""
    if path.suffix in (".json", ".jsonl"):
        rows = [row.get("text") if isinstance(row, dict) else None for row in _read_file(path)]
        if not all(isinstance(row, str) for row in rows):
            raise MopError(f"{path}: WikiText rows need a 'text' field (a string) in every record")
    else:
        try:
            rows = wikitext_rows(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise MopError(f"{path} cannot be parsed: {error}") from None
    if not any(row.strip() for row in rows):
        raise MopError(f"{path} holds no non-empty text")
    if not any(not row.strip() for row in rows):
        raise MopError(f"{path} has no blank row, so it is not a WikiText split (such as wiki.test.raw) and the "
                       "standard perplexity protocol, which joins every row with blank ones included, cannot "
                       "be followed on it")
    return rows


def perplexity_text(spec: str, wikitext: bool = False) -> str:
    """The text perplexity is measured on: for WikiText-2 (the name `wikitext2`, or with `wikitext` a file of a
    WikiText split, see `wikitext_file_rows`), `"\n\n".join(rows)` over every row of the split, blank rows
    included (the protocol of LLM-Pruner, SliceGPT, Wanda, ShortGPT); for other data, its non-empty texts joined
    by blank lines."""
    if spec == "wikitext2" or wikitext:
        path = local_path(spec)
        if path is not None:
            rows = wikitext_file_rows(path)
        else:
            hub_rows, _ = load_rows(spec)
            rows = [row["text"] for row in hub_rows]
        return "\n\n".join(rows)
    return "\n\n".join(load_texts(spec))


def load_examples(spec: str) -> list[Example]:
    """Instruction-tuning rows (Alpaca schema: instruction, input, output)."""
    rows, source = load_rows(spec)
    examples = []
    for number, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str)):
            raise MopError(f"{source}: row {number} lacks the Alpaca fields 'instruction' and 'output' (strings)")
        examples.append(Example(alpaca_prompt(row), row["output"]))
    return examples


def load_calibration(spec: str) -> list[str]:
    """Calibration texts: Alpaca prompts (instruction + input, no response) or plain texts."""
    rows, source = load_rows(spec)
    if rows and isinstance(rows[0], dict) and "instruction" in rows[0]:
        return [alpaca_prompt(row) for row in rows]
    if spec.startswith("wikitext2"):  # paragraphs: the heading rows (" = Title = ") are a few tokens each
        return [text for text in load_texts(spec) if not text.strip().startswith("=")]
    return load_texts(spec)


def sample(items: list, n: int, seed: int) -> list:
    """`n` items drawn without replacement (all of them, in order, if n >= len)."""
    if n >= len(items):
        return list(items)
    return random.Random(seed).sample(items, n)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] int64, 1 on real tokens
    labels: torch.Tensor | None = None  # [B, T] int64, IGNORE where no loss


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(ids: list[list[int]], pad_id: int, labels: list[list[int]] | None = None) -> Batch:
    mask = _pad([[1] * len(r) for r in ids], 0)
    return Batch(_pad(ids, pad_id), mask, None if labels is None else _pad(labels, IGNORE))


def text_batches(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[Batch]:
    """Tokenized texts (truncated to `max_length`), grouped by length into right-padded batches."""
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    ids = sorted((r for r in ids if r), key=len)
    return [collate(ids[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(ids), batch_size)]


def packed_windows(tokenizer, texts: list[str], n: int, length: int, seed: int) -> list[list[int]]:
    """`n` windows of exactly `length` token ids at random offsets (drawn with `seed`) in the texts joined by
    blank lines and tokenized once: the calibration of GPTQ, SparseGPT and SlimGPT, every position a real token
    with up to `length` tokens of context, where one text a prompt leaves short paragraphs and padding."""
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    if len(ids) <= length:
        raise MopError(f"the calibration text has {len(ids)} tokens: too few for packed windows of {length}")
    draw = random.Random(seed)
    return [ids[start : start + length] for start in (draw.randrange(len(ids) - length) for _ in range(n))]


def token_segments(tokenizer, texts: list[str], length: int, limit: int | None = None) -> list[torch.Tensor]:
    """The texts joined by blank lines, tokenized, cut into `length`-token segments ([length] ids each); a
    shorter tail is kept only if there is no full segment."""
    return text_segments(tokenizer, "\n\n".join(texts), length, limit)


def text_segments(tokenizer, text: str, length: int, limit: int | None = None) -> list[torch.Tensor]:
    """`text` tokenized once and cut into consecutive `length`-token segments; the tail shorter than `length`
    is dropped (`numel // length` segments, the standard perplexity protocol) unless it is all there is.
    `limit` keeps the first `limit` segments."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    count = max(len(ids) // length, 1) if len(ids) > 1 else 0
    segments = [ids[i * length : (i + 1) * length] for i in range(count)]
    return segments[:limit] if limit else segments


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading ids `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def sft_rows(tokenizer, examples: list[Example], max_length: int) -> list[Row]:
    """(input_ids, labels) per example: prompt + response tokenized as one text, EOS appended; the prefix that
    the prompt's own tokenization shares is masked (IGNORE), the rest learned. Tokenizing the response on its own
    would differ from the joined text on SentencePiece tokenizers (LLaMA-2, Mistral v0.1, Vicuna), whose first
    response token would get a word-start "▁" the joined text never has. Examples with no response token are
    dropped: a blank response (whitespace only; EOS alone is not a response), or one cut away entirely by
    `max_length`. The one Alpaca row builder: recovery fine-tuning and the candidates' short tuning both call it."""
    rows = []
    for example in examples:
        if not example.response.strip():
            continue
        prompt = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        joined = tokenizer(example.prompt + example.response, add_special_tokens=True)["input_ids"]
        masked = _common_prefix(prompt, joined)
        ids = (joined + [tokenizer.eos_token_id])[:max_length]
        labels = ([IGNORE] * masked + ids[masked:])[:max_length]
        if any(label != IGNORE for label in labels):
            rows.append((ids, labels))
    return rows


def sample_texts_from_model(model, tokenizer, n: int, length: int, seed: int) -> list[str]:
    """Last resort when no data is reachable: texts the model writes itself from its BOS token."""
    log.warning("no calibration data reachable: using %d texts sampled from the model itself", n)
    generator_seed = torch.random.get_rng_state()
    torch.manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = model.generate(
        torch.full((n, 1), start, device=device), do_sample=True, max_new_tokens=length, pad_token_id=tokenizer.pad_token_id
    )
    torch.random.set_rng_state(generator_seed)
    return tokenizer.batch_decode(out, skip_special_tokens=True)
