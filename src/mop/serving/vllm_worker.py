"""The vLLM side of `mop.serving.vllm_check`, run by the interpreter of vLLM's own environment.

    VENV/bin/python src/mop/serving/vllm_worker.py JOBS.json OUT.jsonl

Imports only the standard library and vllm (never mop, torch-side helpers or transformers directly), because
vLLM pins its own torch and transformers and lives in a separate virtual environment. JOBS.json is a list of

    {"model": DIR, "prompt_ids": [[int, ...], ...], "max_new_tokens": N, "top_logprobs": K,
     "max_model_len": L, "hf_overrides": {...} or null}

For each job, in order, one JSON line is appended to OUT.jsonl: greedy token ids and, per generated token, the
log-probabilities of vLLM's top K tokens (raw logits, float32), plus timings and peak memory, or the error.
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
                record.update(run_job(job), ok=True)
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
