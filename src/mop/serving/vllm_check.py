"""Does a checkpoint serve in vLLM exactly as it runs in transformers?

    mop check CKPT [CKPT ...] [--max-new-tokens 16] [--json OUT.json]

For each checkpoint: the same prompts (token ids from the checkpoint's own tokenizer) are decoded greedily in
float32 by transformers, here, and by vLLM, in vLLM's own virtual environment (vLLM pins its own torch and
transformers), through `vllm_worker.py` run by that environment's interpreter. The check passes when the
greedy token ids are equal and vLLM's top-K log-probabilities match transformers' at every step.

The interpreter is `$MOP_VLLM_PYTHON`, else `$MOP_CACHE_DIR/venv-vllm/bin/python` (`~/.cache/mop/...` when
MOP_CACHE_DIR is unset), which `scripts/install-vllm.sh` installs. When neither exists the check reports
"vLLM not found" (`mop check` exits with status 2) instead of passing.

A Qwen2 checkpoint whose heads were pruned needs an override: vLLM's `Qwen2ForCausalLM` (0.32) derives
head_dim from hidden_size / num_attention_heads and ignores the config's `head_dim`, so it cannot load it. A
Qwen2 without sliding window is a LLaMA with q/k/v biases, which vLLM's `LlamaForCausalLM` computes when the
config has `qkv_bias: true`; `serving_overrides` returns that override and the check serves with it, as a user
would: `vllm serve CKPT --hf-overrides '{"architectures": ["LlamaForCausalLM"], "qkv_bias": true}'`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

WORKER = Path(__file__).with_name("vllm_worker.py")
FAILED_JOB_EXIT = 3  # vllm_worker.FAILED_JOB_EXIT (not imported: the worker must stay importable alone)
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three most important inventions of the 20th century are",
)


def default_vllm_python() -> Path:
    cache = Path(os.environ.get("MOP_CACHE_DIR", Path.home() / ".cache" / "mop"))
    return cache / "venv-vllm" / "bin" / "python"


def find_vllm_python() -> tuple[Path | None, str]:
    """(interpreter, "") when vLLM's environment is found, else (None, why not)."""
    configured = os.environ.get("MOP_VLLM_PYTHON")
    candidate = Path(configured) if configured else default_vllm_python()
    origin = "$MOP_VLLM_PYTHON" if configured else "the default location"
    if not candidate.is_file():
        return None, (f"no vLLM interpreter at {candidate} ({origin}); install one with scripts/install-vllm.sh or set "
                      "MOP_VLLM_PYTHON to the python of an environment with vLLM")
    if not os.access(candidate, os.X_OK):
        return None, f"{candidate} ({origin}) is not executable"
    return candidate, ""


def serving_overrides(config: dict) -> dict | None:
    """The `hf_overrides` vLLM needs to load this checkpoint unchanged (None when it needs none)."""
    architecture = (config.get("architectures") or [""])[0]
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    head_dim = config.get("head_dim") or (hidden // heads if heads else None)
    if (architecture == "Qwen2ForCausalLM" and heads and head_dim * heads != hidden
            and not config.get("use_sliding_window")):
        return {"architectures": ["LlamaForCausalLM"], "qkv_bias": True}
    return None


@dataclass
class PromptResult:
    tokens_equal: bool
    first_mismatch: int | None  # generated-token index of the first difference
    near_tie: bool  # the first difference is between two tokens transformers scores within atol
    max_logprob_diff: float  # over vLLM's top-K tokens, at every step before the first difference
    transformers_ids: list[int]
    vllm_ids: list[int]


@dataclass
class CheckResult:
    model: str
    ok: bool
    error: str | None = None
    hf_overrides: dict | None = None
    prompts: list[PromptResult] = field(default_factory=list)
    max_logprob_diff: float | None = None
    transformers_s: float | None = None
    vllm_load_s: float | None = None
    vllm_generate_s: float | None = None
    vllm_maxrss_mb: float | None = None
    vllm_version: str | None = None

    @property
    def tokens_equal(self) -> bool:
        return bool(self.prompts) and all(p.tokens_equal for p in self.prompts)


def transformers_greedy(model_dir: Path, prompts: list[str] | tuple[str, ...], max_new_tokens: int):
    """Prompt token ids, and per prompt the greedy ids and the log-softmax rows (float32, raw logits)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    runs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            cache = DynamicCache(config=model.config)
            out = model(torch.tensor([ids]), cache=cache, use_cache=True)
            tokens, rows = [], []
            for step in range(max_new_tokens):
                row = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                token = int(row.argmax())
                tokens.append(token)
                rows.append(row)
                if step + 1 < max_new_tokens:
                    out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            runs.append((tokens, torch.stack(rows)))
    del model
    return prompt_ids, runs


def run_worker(jobs: list[dict], python: Path, log_dir: Path, timeout_s: float | None = None) -> list[dict]:
    """Run the jobs in vLLM's interpreter, a fresh worker after each failed one; one record per job."""
    records: list[dict] = []
    attempt = 0
    while len(records) < len(jobs):
        attempt += 1
        remaining = jobs[len(records):]
        jobs_file, out_file = log_dir / f"jobs-{attempt}.json", log_dir / f"out-{attempt}.jsonl"
        log_file = log_dir / f"worker-{attempt}.log"
        jobs_file.write_text(json.dumps(remaining))
        limit = timeout_s if timeout_s is not None else 180 + 300 * len(remaining)
        with open(log_file, "w") as log:
            try:
                code = subprocess.run([str(python), str(WORKER), str(jobs_file), str(out_file)], stdout=log,
                                      stderr=subprocess.STDOUT, timeout=limit, env=worker_env()).returncode
            except subprocess.TimeoutExpired:
                code = None
        got = [json.loads(line) for line in out_file.read_text().splitlines()] if out_file.exists() else []
        records.extend(got)
        if code == 0 and len(got) == len(remaining):
            break
        if code == FAILED_JOB_EXIT and got and not got[-1]["ok"]:
            continue  # the worker recorded the failure itself; a fresh one takes the rest
        # crashed, killed or timed out inside a job: that job fails, with the end of the worker's log
        why = "timed out" if code is None else f"exited with status {code}"
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        records.append({"model": remaining[len(got)]["model"], "ok": False,
                        "error": f"vLLM worker {why} ({log_file}):\n{tail}"})
    return records


def worker_env() -> dict:
    env = dict(os.environ)
    # the worker is vLLM's environment's program: nothing of ours on its path
    env.pop("PYTHONPATH", None)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def compare(runs, record: dict, atol: float) -> tuple[list[PromptResult], float]:
    results, worst = [], 0.0
    for (hf_ids, rows), vllm_ids, top in zip(runs, record["token_ids"], record["top_logprobs"]):
        first = next((i for i, (a, b) in enumerate(zip(hf_ids, vllm_ids)) if a != b), None)
        if first is None and len(hf_ids) != len(vllm_ids):
            first = min(len(hf_ids), len(vllm_ids))
        upto = len(hf_ids) if first is None else first
        diff = 0.0
        for step in range(min(upto, len(top))):
            for token, logprob in top[step].items():
                diff = max(diff, abs(float(rows[step, int(token)]) - logprob))
        near_tie = False
        if first is not None and first < len(vllm_ids) and first < len(hf_ids):
            gap = float(rows[first, hf_ids[first]] - rows[first, vllm_ids[first]])
            near_tie = gap <= atol
        worst = max(worst, diff)
        results.append(PromptResult(first is None, first, near_tie, diff, hf_ids, vllm_ids))
    return results, worst


def check(models: list[str | Path], prompts=DEFAULT_PROMPTS, max_new_tokens: int = 16, top_logprobs: int = 5,
          atol: float = 1e-3, python: Path | None = None, max_model_len: int = 512,
          work_dir: Path | None = None) -> list[CheckResult]:
    """Greedy decoding in transformers vs vLLM for every model; raises FileNotFoundError without vLLM."""
    if python is None:
        python, why = find_vllm_python()
        if python is None:
            raise FileNotFoundError(why)
    models = [Path(m).resolve() for m in models]
    jobs, references, results, checked = [], [], [], []
    for model in models:
        result = CheckResult(str(model), ok=False)
        results.append(result)
        start = time.perf_counter()
        try:
            result.hf_overrides = serving_overrides(json.loads((model / "config.json").read_text()))
            prompt_ids, runs = transformers_greedy(model, prompts, max_new_tokens)
        except Exception as error:  # noqa: BLE001 - a checkpoint transformers cannot run is a failed check
            result.error = f"transformers: {type(error).__name__}: {error}"
            continue
        result.transformers_s = time.perf_counter() - start
        references.append(runs)
        checked.append(result)
        jobs.append({"model": str(model), "prompt_ids": prompt_ids, "max_new_tokens": max_new_tokens,
                     "top_logprobs": top_logprobs, "max_model_len": max_model_len,
                     "hf_overrides": result.hf_overrides})
    with tempfile.TemporaryDirectory(prefix="mop-vllm-", dir=work_dir) as tmp:
        records = run_worker(jobs, python, Path(tmp)) if jobs else []
        for result, runs, record in zip(checked, references, records):
            result.vllm_version = record.get("vllm_version")
            result.vllm_maxrss_mb = record.get("maxrss_mb")
            if not record["ok"]:
                result.error = f"vLLM: {record['error']}"
                continue
            result.vllm_load_s, result.vllm_generate_s = record["load_s"], record["generate_s"]
            result.prompts, result.max_logprob_diff = compare(runs, record, atol)
            result.ok = result.max_logprob_diff <= atol and all(p.tokens_equal or p.near_tie for p in result.prompts)
    return results


def summary(result: CheckResult) -> str:
    if result.error:
        return f"FAIL  {result.model}\n      {result.error.splitlines()[0]}"
    verdict = "ok   " if result.ok else "FAIL "
    tokens = "identical" if result.tokens_equal else ", ".join(
        "same" if p.tokens_equal else f"differ at {p.first_mismatch}{' (near-tie)' if p.near_tie else ''}"
        for p in result.prompts)
    extra = f"; served with --hf-overrides '{json.dumps(result.hf_overrides)}'" if result.hf_overrides else ""
    return (f"{verdict} {result.model}\n      greedy tokens {tokens}; max |Δ logprob| {result.max_logprob_diff:.1e}; "
            f"vLLM load {result.vllm_load_s:.1f} s, generate {result.vllm_generate_s:.1f} s, "
            f"peak {result.vllm_maxrss_mb:.0f} MB{extra}")
