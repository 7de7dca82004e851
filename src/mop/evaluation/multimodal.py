"""Image + text evaluation of a vision-language model (LLaVA) after its language model was pruned.

- `mllm_demo`, offline: the log-likelihood of a reference answer to a question about an image, with that image
  and with another one (`$MOP_DATA_DIR/mllm_demo`). A model whose visual path works makes its own image's answer
  more likely; the record gives both mean NLLs per answer token and how often the own image wins.
- The paper's benchmarks (ScienceQA-IMG, VizWiz, MM-Vet, LLaVA-Bench) run through lmms-eval on the saved
  checkpoint when lmms-eval is installed and its data (and, for MM-Vet and LLaVA-Bench, its GPT judge) is reachable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from mop.errors import MopError
from mop.models import LoadedModel, count_all_params, count_params, input_device
from mop.models.llava import PROMPT
from mop.provenance import versions

DEMO_TASK = "mllm_demo"
DEMO_FILE = "mllm_demo/mllm_demo.json"  # under MOP_DATA_DIR; the images sit beside it
# the paper's benchmarks (its section 4.4) under their lmms-eval task names
LMMS_EVAL_TASKS = {"scienceqa_img": "ScienceQA-IMG", "vizwiz_vqa_val": "VizWiz", "mmvet": "MM-Vet",
                   "llava_in_the_wild": "LLaVA-Bench (In-the-Wild)"}
MULTIMODAL_TASKS = (DEMO_TASK, *LMMS_EVAL_TASKS)


@dataclass(frozen=True)
class ImageQuestion:
    image: Path
    question: str  # without the <image> placeholder
    answer: str  # the reference answer


def demo_items(path: Path) -> list[ImageQuestion]:
    """The first exchange of every conversation in an mllm_demo file (LLaMA-Factory's schema: `messages` with
    user/assistant turns, `images` named relative to the file's folder or beside it)."""
    try:
        rows = json.loads(path.read_text())
        items = []
        for row in rows:
            question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
            image = path.parent / Path(row["images"][0]).name
            items.append(ImageQuestion(image, question.replace("<image>", "").strip(), answer))
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise MopError(f"{path} is not an mllm_demo file (messages[user, assistant], images)") from None
    missing = sorted({str(item.image) for item in items if not item.image.is_file()})
    if missing:
        raise MopError(f"{path}: image {missing[0]} not found")
    return items


def demo_file() -> Path:
    data_dir = os.environ.get("MOP_DATA_DIR")
    path = Path(data_dir) / DEMO_FILE if data_dir else None
    if path is None or not path.is_file():
        raise MopError(f"{DEMO_TASK} needs $MOP_DATA_DIR/{DEMO_FILE} (MOP_DATA_DIR is {data_dir or 'unset'})")
    return path


@torch.no_grad()
def answer_nll(loaded: LoadedModel, image: Path, question: str, answer: str) -> tuple[float, int]:
    """Summed next-token NLL (nats) of `answer` after the image + question prompt, and its token count."""
    from PIL import Image

    processor, model = loaded.processor, loaded.model
    with Image.open(image) as picture:
        prompt = processor(images=picture.convert("RGB"), text=PROMPT.format(question=question), return_tensors="pt")
    answer_ids = loaded.tokenizer(" " + answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    device = input_device(model)
    ids = torch.cat([prompt["input_ids"], answer_ids], dim=1).to(device)  # [1, T]
    pixels = prompt["pixel_values"].to(device, next(model.parameters()).dtype)
    logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[0, -answer_ids.shape[1] - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.float(), answer_ids[0].to(device), reduction="sum")
    return nll.item(), answer_ids.shape[1]


def demo_check(loaded: LoadedModel, path: Path | None = None) -> dict:
    """Per item, the answer's NLL with its own image and with the next other image of the file; the means per
    answer token and the share of items whose own image gives the lower NLL."""
    if loaded.processor is None:
        raise MopError(f"{loaded.name} has no processor: {DEMO_TASK} needs image inputs")
    path = path or demo_file()
    items = demo_items(path)
    images = sorted({item.image for item in items})
    if len(images) < 2:
        raise MopError(f"{path}: {DEMO_TASK} compares images and needs at least two")
    per_item, tokens, own_total, other_total = [], 0, 0.0, 0.0
    for item in items:
        other = images[(images.index(item.image) + 1) % len(images)]
        own_nll, count = answer_nll(loaded, item.image, item.question, item.answer)
        other_nll, _ = answer_nll(loaded, other, item.question, item.answer)
        per_item.append({"image": item.image.name, "other_image": other.name, "answer_tokens": count,
                         "nll_own_image": own_nll, "nll_other_image": other_nll})
        tokens, own_total, other_total = tokens + count, own_total + own_nll, other_total + other_nll
    return {
        "items": len(items), "answer_tokens": tokens,
        "nll_per_token": {"own_image": own_total / tokens, "other_image": other_total / tokens},
        "own_image_preferred": sum(r["nll_own_image"] < r["nll_other_image"] for r in per_item) / len(items),
        "prompt": PROMPT, "data": str(path), "per_item": per_item,
    }


def validate_multimodal_tasks(tasks: list[str]) -> None:
    """Fail before a model loads: the demo's file missing, or lmms-eval missing for the paper's benchmarks."""
    benchmarks = [task for task in tasks if task in LMMS_EVAL_TASKS]
    if benchmarks and importlib.util.find_spec("lmms_eval") is None:
        raise MopError(f"{', '.join(benchmarks)} need lmms-eval (pip install lmms-eval) and its data from the Hugging "
                       f"Face hub; offline, --tasks {DEMO_TASK} checks the image path on a local demo")
    if DEMO_TASK in tasks:
        demo_file()


def lmms_eval_benchmarks(loaded: LoadedModel, tasks: list[str], limit: int | None) -> dict:
    """The paper's benchmarks through lmms-eval's `llava_hf` model on the checkpoint directory (lmms-eval loads it
    itself, on the device and in the dtype of `loaded`), each with its official metrics as lmms-eval reports them.
    MM-Vet and LLaVA-Bench are scored by a GPT judge that lmms-eval calls (an OpenAI API key)."""
    from lmms_eval.evaluator import simple_evaluate

    device = str(input_device(loaded.model))
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    output = simple_evaluate(model="llava_hf", model_args=f"pretrained={loaded.directory},device={device},dtype={dtype}",
                             tasks=tasks, limit=limit, batch_size=1, log_samples=False)
    return {task: {"benchmark": LMMS_EVAL_TASKS[task], "metrics": output["results"][task]} for task in tasks}


def evaluate_multimodal(loaded: LoadedModel, tasks: list[str], limit: int | None = None) -> dict:
    """The record of the image + text tasks in `tasks` (names in `MULTIMODAL_TASKS`); `limit` caps the documents
    of the lmms-eval benchmarks."""
    validate_multimodal_tasks(tasks)
    if not loaded.adapter.multimodal:
        raise MopError(f"{', '.join(tasks)} need a vision-language model; {loaded.name} is "
                       f"{type(loaded.model).__name__}")
    start = time.perf_counter()
    results = {DEMO_TASK: demo_check(loaded)} if DEMO_TASK in tasks else {}
    benchmarks = [task for task in tasks if task in LMMS_EVAL_TASKS]
    if benchmarks:
        results |= lmms_eval_benchmarks(loaded, benchmarks, limit)
    model = {"name": loaded.name, "weights_sha256": loaded.weights_sha256, "params": count_params(loaded.model),
             "whole_model_params": count_all_params(loaded.model),
             "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch.")}
    return {"tasks": {name: results[name] for name in tasks}, "model": model, "seconds": time.perf_counter() - start,
            "versions": versions(extra=("lmms_eval",))}


def summary_table(record: dict) -> Table:
    table = Table(title="image + text")
    for column in ("task", "result"):
        table.add_column(column)
    for name, result in record["tasks"].items():
        if name == DEMO_TASK:
            nll = result["nll_per_token"]
            table.add_row(name, f"NLL/token {nll['own_image']:.3f} (own image) vs {nll['other_image']:.3f} (other); "
                                f"own image preferred in {result['own_image_preferred']:.0%} of {result['items']}")
        else:
            table.add_row(name, json.dumps(result["metrics"]))
    return table
