"""The paper's latency protocol (SPEC §4, paper §4.3): batch 1, a 12-token prompt, exactly 128 greedy tokens with
the KV cache, 20 runs per model with the models alternating, the first 10 runs discarded, mean and std of the rest;
speedup = baseline time / candidate time, measured in the same process.

The tokens come from our own greedy loop, not from `generate`: it times prefill and decode apart, and it runs
exactly the forward passes that pruning can make faster (no logits processors or stopping criteria, EOS an
ordinary token), while choosing the same tokens as greedy `generate`. Every run also times `model.generate`
(greedy, exactly new_tokens tokens), the number a user of `generate` sees, so the record has both — unless
`time_generate` is off, which halves the time a measurement takes (a study timing many checkpoints)."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from rich.table import Table
from tqdm.auto import tqdm
from transformers import DynamicCache

from mop.errors import MopError
from mop.models import LoadedModel, count_params, input_device, load_model
from mop.models.llava import PROMPT as IMAGE_PROMPT
from mop.provenance import versions

log = logging.getLogger(__name__)

# The prompts are the first tokens of this passage (repeated as often as needed) as the tokenizer encodes it,
# special tokens (BOS) included: the same ids for every model that shares the tokenizer.
PROMPT_TEXT = (
    "The old lighthouse stood on a rocky point at the edge of the bay, and for more than a century its keepers "
    "climbed the narrow stairs every evening to light the lamp that guided fishing boats home through fog and storm. "
)
PROTOCOL = (
    "batch 1; the fixed prompt is run through the model (prefill) and exactly new_tokens tokens are chosen greedily "
    "(argmax over the whole vocabulary, EOS does not stop generation) with a transformers DynamicCache under "
    "torch.inference_mode; prefill_s = prompt forward pass + first token, decode_ms_per_token = the other "
    "new_tokens - 1 tokens' time / (new_tokens - 1), end_to_end_s = prefill_s + decode time; prefill throughput is "
    "one forward pass over a prefill_tokens-long prompt; each run times every model once, in the given order on even "
    "runs and reversed on odd runs; the first warmup runs of each model are discarded; mean and sample std "
    "(n - 1) over the kept runs; speedup is baseline / candidate end-to-end time per run (same run index), "
    "mean and std over the kept runs, and ratio_of_means = mean baseline time / mean candidate time; each run "
    "also times model.generate on the same prompt (greedy, min_new_tokens = max_new_tokens = new_tokens, its "
    "default DynamicCache and the model's generation config), after the greedy loop and the prefill pass: "
    "generate.end_to_end_s, compared in generate_speedup; generate.same_tokens_as_loop says whether its tokens "
    "equal the loop's in every run (they differ only where min_new_tokens suppresses an EOS the loop chose, or "
    "the generation config adds logits processors); with time_generate off, generate is not timed (generate and "
    "generate_speedup are null)"
)

Clock = Callable[[], float]
IMAGE_QUESTION = "What is shown in this image?"  # a vision-language model's image + text prompt (`image_prompt`)


@dataclass
class LatencySettings:
    runs: int = 20  # per model
    warmup: int = 10  # first runs of each model that are discarded
    prompt_tokens: int = 12
    new_tokens: int = 128
    prefill_tokens: int = 512  # prompt length of the prefill throughput measurement
    time_generate: bool = True  # also time model.generate every run (about half of a measurement's time)

    def validate(self) -> None:
        if self.runs - self.warmup < 2 or self.warmup < 0:
            raise MopError(f"--warmup {self.warmup} must be in [0, runs - 2] (runs {self.runs}): "
                           "mean and std need at least 2 kept runs")
        if self.prompt_tokens < 1 or self.prefill_tokens < 1:
            raise MopError("--prompt-tokens and --prefill-tokens must be at least 1")
        if self.new_tokens < 2:
            raise MopError(f"--new-tokens {self.new_tokens} must be at least 2 (one prefill token + decode)")


@dataclass
class Generation:
    tokens: torch.Tensor  # [1, new_tokens]
    prefill_s: float  # prompt forward pass + first token
    decode_s: float  # the other new_tokens - 1 tokens
    kv_cache_bytes: int  # keys and values held at the end


@dataclass
class Run:
    prefill_s: float
    decode_s: float
    long_prefill_s: float  # one forward pass over the prefill_tokens-long prompt
    kv_cache_bytes: int
    cuda_peak_bytes: int | None  # peak CUDA memory allocated during the run above what was allocated before it
    generate_s: float | None  # model.generate of the same tokens, end to end (None: not timed)
    generate_new_tokens: int | None  # how many tokens generate added
    generate_same_tokens: bool | None  # generate's tokens equal the greedy loop's

    @property
    def end_to_end_s(self) -> float:
        return self.prefill_s + self.decode_s


def fixed_prompt(tokenizer, length: int) -> torch.Tensor:
    """The first `length` ids of PROMPT_TEXT (repeated as needed) as `tokenizer` encodes it: [1, length]."""
    text = PROMPT_TEXT
    while len(ids := tokenizer(text)["input_ids"]) < length:
        text += PROMPT_TEXT
    return torch.tensor([ids[:length]])


def _synced(clock: Clock, tensor: torch.Tensor) -> float:
    """The clock, read once the device that holds `tensor` has finished its queued work."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return clock()


def cache_bytes(cache: DynamicCache) -> int:
    return sum(t.nbytes for layer in cache.layers if layer.is_initialized for t in (layer.keys, layer.values))


@torch.inference_mode()
def greedy_generate(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, clock: Clock = time.perf_counter,
                    pixel_values: torch.Tensor | None = None) -> Generation:
    """Exactly `new_tokens` greedy tokens after `prompt_ids` ([1, prompt_len], on the model's input device); a
    vision-language model gets the prompt's image as `pixel_values` in the prefill."""
    cache = DynamicCache(config=model.config)
    image = {} if pixel_values is None else {"pixel_values": pixel_values}
    started = _synced(clock, prompt_ids)
    logits = model(input_ids=prompt_ids, cache=cache, use_cache=True, logits_to_keep=1, **image).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    prefilled = _synced(clock, token)
    tokens = [token]
    for _ in range(new_tokens - 1):
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    finished = _synced(clock, token)
    return Generation(torch.cat(tokens, dim=1), prefilled - started, finished - prefilled, cache_bytes(cache))


@torch.inference_mode()
def timed_prefill(model: nn.Module, prompt_ids: torch.Tensor, clock: Clock = time.perf_counter) -> float:
    """Seconds of one prefill forward pass (KV cache filled, last position's logits) over `prompt_ids`."""
    started = _synced(clock, prompt_ids)
    logits = model(input_ids=prompt_ids, cache=DynamicCache(config=model.config), use_cache=True,
                   logits_to_keep=1).logits
    return _synced(clock, logits) - started


@torch.inference_mode()
def timed_generate(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, clock: Clock = time.perf_counter
                   ) -> tuple[torch.Tensor, float]:
    """`model.generate` after `prompt_ids` ([1, prompt_len]), greedy and forced to exactly `new_tokens` tokens:
    the new tokens [1, new_tokens] and the seconds it took."""
    started = _synced(clock, prompt_ids)
    output = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, num_beams=1,
                            min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    finished = _synced(clock, output)
    return output[:, prompt_ids.shape[1]:], finished - started


def _cuda_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def timed_run(model: nn.Module, prompt: torch.Tensor, long_prompt: torch.Tensor, settings: LatencySettings,
              clock: Clock = time.perf_counter) -> Run:
    device = input_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _cuda_allocated(device)
    prompt = prompt.to(device)
    generation = greedy_generate(model, prompt, settings.new_tokens, clock)
    long_prefill_s = timed_prefill(model, long_prompt.to(device), clock)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    timing = generation.prefill_s, generation.decode_s, long_prefill_s, generation.kv_cache_bytes, peak
    if not settings.time_generate:
        return Run(*timing, None, None, None)
    generated, generate_s = timed_generate(model, prompt, settings.new_tokens, clock)
    return Run(*timing, generate_s, generated.shape[1], torch.equal(generated, generation.tokens))


def _bar(settings: LatencySettings, label: str) -> tqdm:
    """The run indices 0 … runs − 1 under a progress bar labelled `label` (a run times every model once)."""
    return tqdm(range(settings.runs), desc=label, unit="run",
                postfix=f"first {settings.warmup} discarded" if settings.warmup else None)


def run_order(names: list[str], run: int) -> list[str]:
    """Models in the given order on even runs, reversed on odd runs (neither always goes first)."""
    return names if run % 2 == 0 else names[::-1]


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters (tied ones once)."""
    return sum(p.nbytes for p in model.parameters())


def summarize(model: nn.Module, runs: list[Run], settings: LatencySettings) -> dict:
    """Mean and std over the kept runs (after the warmup) of one model; `raw` holds every run, warmup included."""
    kept = runs[settings.warmup:]
    memory = {"weight_bytes": weight_bytes(model), "kv_cache_bytes": kept[-1].kv_cache_bytes}
    if kept[-1].cuda_peak_bytes is not None:
        memory["cuda_peak_allocated_bytes"] = memory["weight_bytes"] + max(r.cuda_peak_bytes for r in kept)
    return {
        "params": count_params(model),
        "end_to_end_s": mean_std([r.end_to_end_s for r in kept]),
        "prefill_s": mean_std([r.prefill_s for r in kept]),
        "decode_ms_per_token": mean_std([1000 * r.decode_s / (settings.new_tokens - 1) for r in kept]),
        "prefill_tokens_per_s": {"prompt_tokens": settings.prefill_tokens,
                                 **mean_std([settings.prefill_tokens / r.long_prefill_s for r in kept])},
        "generate": {"end_to_end_s": mean_std([r.generate_s for r in kept]),
                     "new_tokens": kept[-1].generate_new_tokens,
                     "same_tokens_as_loop": all(r.generate_same_tokens for r in runs)}
        if settings.time_generate else None,
        "memory": memory,
        "raw": {"end_to_end_s": [r.end_to_end_s for r in runs], "prefill_s": [r.prefill_s for r in runs],
                "decode_s": [r.decode_s for r in runs], "long_prefill_s": [r.long_prefill_s for r in runs],
                **({"generate_s": [r.generate_s for r in runs]} if settings.time_generate else {})},
    }


def measure(models: dict[str, nn.Module], tokenizer, settings: LatencySettings, clock: Clock = time.perf_counter
            ) -> dict[str, dict]:
    """Time every model under the protocol on the fixed prompts, alternating them run by run; per model name, see
    `summarize`."""
    prompts = fixed_prompt(tokenizer, settings.prompt_tokens), fixed_prompt(tokenizer, settings.prefill_tokens)
    return measure_on(models, *prompts, settings, clock)


def measure_on(models: dict[str, nn.Module], prompt: torch.Tensor, long_prompt: torch.Tensor,
               settings: LatencySettings, clock: Clock = time.perf_counter) -> dict[str, dict]:
    """`measure` on given prompt ids: `prompt` [1, prompt_tokens], `long_prompt` [1, prefill_tokens]."""
    settings.validate()
    for name, model in models.items():
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max(settings.prompt_tokens + settings.new_tokens, settings.prefill_tokens) > limit:
            raise MopError(f"{name}: prompt and generated tokens exceed its {limit} positions")
    names = list(models)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for run in _bar(settings, f"latency: {' and '.join(names)}"):
        for name in run_order(names, run):
            runs[name].append(timed_run(models[name], prompt, long_prompt, settings, clock))
    return {name: summarize(models[name], runs[name], settings) for name in names}


def speedup_stats(baseline_s: list[float], candidate_s: list[float]) -> dict:
    """Per-run speedups baseline / candidate (runs paired by index): their mean and sample std, and the ratio of
    the mean times."""
    ratios = [b / c for b, c in zip(baseline_s, candidate_s, strict=True)]
    return {**mean_std(ratios), "ratio_of_means": statistics.mean(baseline_s) / statistics.mean(candidate_s),
            "runs": len(ratios)}


def image_prompt(processor) -> dict[str, torch.Tensor]:
    """A vision-language model's fixed image + text prompt: a synthetic 336 × 336 grey ramp (timing does not depend
    on the picture; the processor resizes it like any image) and IMAGE_QUESTION in LLaVA-1.5's format."""
    from PIL import Image

    picture = Image.linear_gradient("L").resize((336, 336)).convert("RGB")
    return dict(processor(images=picture, text=IMAGE_PROMPT.format(question=IMAGE_QUESTION), return_tensors="pt"))


def image_prompt_latency(roles: dict[str, LoadedModel], processor, settings: LatencySettings,
                         clock: Clock = time.perf_counter) -> dict:
    """The protocol on the image + text prompt (`image_prompt`): the same alternation, warmup and statistics as
    the text prompt; prefill = vision tower, projector and the prompt's forward pass, and the first token."""
    inputs = image_prompt(processor)
    runs: dict[str, list[Generation]] = {role: [] for role in roles}
    for run in _bar(settings, f"latency on an image: {' and '.join(roles)}"):
        for role in run_order(list(roles), run):
            model = roles[role].model
            device, dtype = input_device(model), next(model.parameters()).dtype
            runs[role].append(greedy_generate(model, inputs["input_ids"].to(device), settings.new_tokens, clock,
                                              inputs["pixel_values"].to(device, dtype)))
    kept = {role: generations[settings.warmup:] for role, generations in runs.items()}

    def end_to_end(generations: list[Generation]) -> list[float]:
        return [g.prefill_s + g.decode_s for g in generations]

    models = {role: {"end_to_end_s": mean_std(end_to_end(kept[role])),
                     "prefill_s": mean_std([g.prefill_s for g in kept[role]]),
                     "decode_ms_per_token": mean_std([1000 * g.decode_s / (settings.new_tokens - 1) for g in kept[role]]),
                     "raw": {"end_to_end_s": end_to_end(runs[role])}} for role in roles}
    speedup = speedup_stats(end_to_end(kept["baseline"]), end_to_end(kept["candidate"])) if "baseline" in roles else None
    prompt = {"text": IMAGE_PROMPT.format(question=IMAGE_QUESTION), "tokens": inputs["input_ids"].shape[1],
              "image": "336x336 synthetic grey ramp"}
    return {"prompt": prompt, "models": models, "speedup": speedup}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} logical cores"


def source_of(directory: Path) -> dict | None:
    """The source model recorded in the `mop.json` of `directory` (`name`, `sha256`); None for a model that
    `mop` did not write."""
    provenance = directory / "mop.json"
    if not provenance.is_file():
        return None
    try:
        source = json.loads(provenance.read_text())["source"]
        if isinstance(source, dict) and "name" in source:
            return source
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    raise MopError(f"{provenance} is corrupt or names no source model; give --baseline")


def source_baseline(candidate: LoadedModel, device: str, dtype: str) -> LoadedModel | None:
    """The source model named in the candidate's `mop.json`, loaded like the candidate; None for a model that
    `mop` did not write."""
    source = source_of(candidate.directory)
    if source is None:
        return None
    name = source["name"]
    log.info("baseline: %s (the source named in %s)", name, candidate.directory / "mop.json")
    baseline = load_model(name, device, dtype)
    if baseline.weights_sha256 != source.get("sha256"):
        log.warning("the weights of %s differ from those %s was pruned from", name, candidate.directory)
    return baseline


def benchmark(candidate: LoadedModel, baseline: LoadedModel | None, settings: LatencySettings) -> dict:
    """The full latency record of `candidate`, timed against `baseline` in the same run when one is given."""
    roles = {"baseline": baseline, "candidate": candidate} if baseline is not None else {"candidate": candidate}
    prompt = fixed_prompt(candidate.tokenizer, settings.prompt_tokens)
    if baseline is not None:
        if not torch.equal(fixed_prompt(baseline.tokenizer, settings.prompt_tokens), prompt):
            raise MopError("the baseline and the candidate tokenize the prompt differently; they need one tokenizer")
        placement = {(input_device(m.model), next(m.model.parameters()).dtype) for m in roles.values()}
        if len(placement) > 1:
            found = ", ".join(sorted(f"{device} {dtype}" for device, dtype in placement))
            raise MopError(f"the baseline and the candidate must share device and dtype, not {found}")
    results = measure({role: loaded.model for role, loaded in roles.items()}, candidate.tokenizer, settings)
    for role, loaded in roles.items():
        results[role] = {"name": loaded.name, "weights_sha256": loaded.weights_sha256, **results[role]}

    def compare(metric: str) -> dict | None:
        if baseline is None or metric == "generate_s" and not settings.time_generate:
            return None
        kept = {role: results[role]["raw"][metric][settings.warmup:] for role in roles}
        return {"of": metric, **speedup_stats(kept["baseline"], kept["candidate"])}

    device = input_device(candidate.model)
    return {
        "protocol": PROTOCOL,
        "settings": asdict(settings),
        "prompt": {"ids": prompt[0].tolist(), "text": candidate.tokenizer.decode(prompt[0])},
        "device": describe_device(device),
        "dtype": str(next(candidate.model.parameters()).dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "models": results,
        "speedup": compare("end_to_end_s"),
        "decode_speedup": compare("decode_s"),
        "generate_speedup": compare("generate_s"),
        "image_prompt": image_prompt_latency(roles, candidate.processor, settings) if candidate.processor else None,
        # process-wide (every model loaded in this process, and everything else it holds): an upper bound only
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "versions": versions(),
    }


def summary_table(record: dict) -> Table:
    """A rich table of a `benchmark` record: one column per model."""
    roles = list(record["models"])
    table = Table(title=f"latency on {record['device']}, {record['dtype']}, {record['torch_threads']} threads")
    table.add_column("")
    for role in roles:
        table.add_column(f"{role}\n{record['models'][role]['name']}", justify="right")

    def row(label: str, cell: Callable[[dict], str]) -> None:
        table.add_row(label, *(cell(record["models"][role]) for role in roles))

    mebibytes = 2**20
    settings = record["settings"]
    row("parameters", lambda r: f"{r['params']:,}")
    row(f"end-to-end s ({settings['new_tokens']} tokens)",
        lambda r: f"{r['end_to_end_s']['mean']:.3f} ± {r['end_to_end_s']['std']:.3f}")
    row("decode ms/token", lambda r: f"{r['decode_ms_per_token']['mean']:.2f} ± {r['decode_ms_per_token']['std']:.2f}")
    if record["models"][roles[0]]["generate"] is not None:
        row(f"generate() s ({settings['new_tokens']} tokens)",
            lambda r: f"{r['generate']['end_to_end_s']['mean']:.3f} ± {r['generate']['end_to_end_s']['std']:.3f}")
    row(f"prefill ms ({settings['prompt_tokens']} tokens)",
        lambda r: f"{1000 * r['prefill_s']['mean']:.1f} ± {1000 * r['prefill_s']['std']:.1f}")
    row(f"prefill tokens/s ({settings['prefill_tokens']} tokens)",
        lambda r: f"{r['prefill_tokens_per_s']['mean']:,.0f} ± {r['prefill_tokens_per_s']['std']:,.0f}")
    row("weights MiB", lambda r: f"{r['memory']['weight_bytes'] / mebibytes:.1f}")
    row("KV cache MiB (end)", lambda r: f"{r['memory']['kv_cache_bytes'] / mebibytes:.2f}")
    if "cuda_peak_allocated_bytes" in record["models"][roles[0]]["memory"]:
        row("CUDA peak MiB", lambda r: f"{r['memory']['cuda_peak_allocated_bytes'] / mebibytes:.1f}")
    image = record.get("image_prompt")
    if image:
        seconds = [image["models"][role]["end_to_end_s"] for role in roles]
        table.add_row(f"image + text end-to-end s ({image['prompt']['tokens']} prompt tokens)",
                      *(f"{s['mean']:.3f} ± {s['std']:.3f}" for s in seconds))
    table.caption = "; ".join(
        f"{label} speedup {s['mean']:.3f} ± {s['std']:.3f} (ratio of means {s['ratio_of_means']:.3f})"
        for label, s in (("end-to-end", record["speedup"]), ("decode", record["decode_speedup"]),
                         ("generate()", record["generate_speedup"]),
                         ("image + text", (image or {}).get("speedup"))) if s is not None)
    return table
