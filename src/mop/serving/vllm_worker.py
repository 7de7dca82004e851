"""The vLLM side of `mop.serving.vllm_check` and `mop.latency.vllm_bench`, run by the interpreter of vLLM's own
environment.

    VENV/bin/python src/mop/serving/vllm_worker.py JOBS.json OUT.jsonl

Imports only the standard library and vllm (never mop, torch-side helpers or transformers directly), because
vLLM pins its own torch and transformers and lives in a separate virtual environment. JOBS.json is a list of
check jobs

    {"model": DIR, "prompt_ids": [[int, ...], ...], "max_new_tokens": N, "top_logprobs": K,
     "max_model_len": L, "hf_overrides": {...} or null}

whose record is the greedy token ids and, per generated token, the log-probabilities of vLLM's top K tokens
(raw logits, float32), and of bench jobs

    {"kind": "bench", "model": NAME, "engines": {ROLE: {"model": DIR, "hf_overrides": ...}, ...},
     "prompt_ids": [int, ...], "new_tokens": N, "runs": R, "batch_prompt_ids": [[int, ...], ...],
     "batch_runs": R2, "max_model_len": L, "prefill_prompt_ids": [int, ...] (optional)}

whose record is the raw seconds of every run per role (see `run_bench`). For each job, in order, one JSON line
is appended to OUT.jsonl, with timings and peak memory, or the error.
A failed engine start leaves vLLM's in-process state unusable, so after a failed job the worker exits with
status 3 and the caller starts a fresh worker for the remaining jobs.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback

# Before vllm is imported: the engine runs in this process (no engine-core subprocess, no __main__ guard
# needed), with a small KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAILED_JOB_EXIT = 3


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, seed=0,
              max_model_len=job.get("max_model_len", 512), hf_overrides=job.get("hf_overrides") or None,
              disable_log_stats=True)
    loaded = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True,
                            logprobs=job.get("top_logprobs", 5))
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompt_ids"]], params,
                           use_tqdm=False)
    done = time.perf_counter()
    token_ids, top = [], []
    for output in outputs:
        completion = output.outputs[0]
        token_ids.append(list(completion.token_ids))
        top.append([{str(t): lp.logprob for t, lp in step.items()} for step in completion.logprobs])
    del llm
    gc.collect()
    return {"token_ids": token_ids, "top_logprobs": top, "load_s": loaded - start, "generate_s": done - loaded}


def run_bench(job: dict) -> dict:
    """Every engine loaded side by side, then `runs` rounds in which each times, in turn (the order reversed on
    odd rounds), the first token and then all `new_tokens` greedy tokens of the one prompt (batch 1, EOS
    ignored), and, when the job has `prefill_prompt_ids`, the first token of that long prompt; then `batch_runs`
    rounds of all `batch_prompt_ids` at once, N concurrent requests of `new_tokens` each. Prefix caching is off,
    so every round computes its prompt."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engines = {role: LLM(model=spec["model"], dtype=job.get("dtype", "float32"), enforce_eager=True, seed=0,
                         max_model_len=job.get("max_model_len", 512), hf_overrides=spec.get("hf_overrides") or None,
                         enable_prefix_caching=False, disable_log_stats=True)
               for role, spec in job["engines"].items()}
    greedy = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prompt = [TokensPrompt(prompt_token_ids=job["prompt_ids"])]
    long_prompt = [TokensPrompt(prompt_token_ids=job["prefill_prompt_ids"])] if job.get("prefill_prompt_ids") else []
    batch = [TokensPrompt(prompt_token_ids=ids) for ids in job["batch_prompt_ids"]]
    roles = list(engines)
    raw = {role: {"first_token_s": [], "end_to_end_s": [], "prefill_s": [], "batch_s": [], "batch_new_tokens": []}
           for role in roles}

    def timed(role: str, prompts: list, params) -> tuple[float, int]:
        """Seconds of one `generate` call, and the tokens it produced."""
        started = time.perf_counter()
        outputs = engines[role].generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)

    for run in range(job["runs"]):
        for role in roles if run % 2 == 0 else roles[::-1]:
            raw[role]["first_token_s"].append(timed(role, prompt, first)[0])
            seconds, tokens = timed(role, prompt, greedy)
            if tokens != job["new_tokens"]:
                raise RuntimeError(f"{role} generated {tokens} tokens, not {job['new_tokens']}")
            raw[role]["end_to_end_s"].append(seconds)
            if long_prompt:
                raw[role]["prefill_s"].append(timed(role, long_prompt, first)[0])
    for run in range(job["batch_runs"]):
        for role in roles if run % 2 == 0 else roles[::-1]:
            seconds, tokens = timed(role, batch, greedy)
            raw[role]["batch_s"].append(seconds)
            raw[role]["batch_new_tokens"].append(tokens)
    engines.clear()  # free every engine before the worker takes its next job
    gc.collect()
    return {"raw": raw}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    jobs = json.loads(open(argv[0]).read())
    started = time.perf_counter()
    import vllm

    import_s = time.perf_counter() - started
    with open(argv[1], "a") as out:
        for job in jobs:
            record = {"model": job["model"], "vllm_version": vllm.__version__, "import_s": import_s}
            try:
                record.update(run_bench(job) if job.get("kind") == "bench" else run_job(job), ok=True)
            except Exception as error:  # noqa: BLE001 - reported to the caller, which decides
                traceback.print_exc()
                record.update(ok=False, error=f"{type(error).__name__}: {error}")
            record["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out.write(json.dumps(record) + "\n")
            out.flush()
            if not record["ok"]:
                return FAILED_JOB_EXIT
            import_s = 0.0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
