"""`mop eval`: zero-shot accuracy through lm-eval's own task definitions (`mop.evaluation.tasks`), offline,
and WikiText-2 perplexity (`mop.evaluation.perplexity`), in one record."""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.table import Table

from mop import logs
from mop.errors import MopError
from mop.evaluation.perplexity import perplexity
from mop.evaluation.tasks import PAPER_METRIC, PERPLEXITY_TASK, build_task, validate_tasks
from mop.models import LoadedModel, count_all_params, count_params, input_device
from mop.provenance import versions


def validate_settings(limit: int | None, batch_size: int, ppl_segment_length: int,
                      ppl_segments: int | None = None) -> None:
    """Fail before a model loads on a --limit, --batch-size, --ppl-segment-length or --ppl-segments below its
    minimum."""
    for option, value, least in (("limit", limit, 1), ("batch size", batch_size, 1),
                                 ("ppl segment length", ppl_segment_length, 2), ("ppl segments", ppl_segments, 1)):
        if value is not None and value < least:
            raise MopError(f"{option} must be an integer >= {least}, not {value}")


def _number(value) -> float | None:
    """lm-eval writes "N/A" for a stderr it cannot compute (e.g. one sample)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def accuracy(loaded: LoadedModel, tasks: list[str], limit: int | None, batch_size: int,
             task_files: dict[str, Path] | None = None) -> dict:
    """Zero-shot acc / acc_norm (and their stderr) of lm-eval's tasks on the in-memory model, one task at a time
    under its own labelled bar (lm-eval's own bars go to the log)."""
    import lm_eval.api.task
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    from mop.evaluation.labelled_lm import LabelledLM

    built = {name: build_task(name, task_files) for name in tasks}  # every data error before any scoring
    lm = LabelledLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    results = {}
    for name, (task, source) in built.items():
        task.set_config(key="num_fewshot", value=0)
        lm.label = f"evaluate {name}"
        # lm-eval's evaluate rather than simple_evaluate: the same scoring without reseeding the global RNGs or
        # collecting environment information in subprocesses
        with logs.bars_to_log(lm_eval.api.task):
            output = lm_eval_evaluate(lm=lm, task_dict={name: task}, limit=limit, log_samples=False)
        metrics = output["results"][name]
        results[name] = {key: _number(metrics.get(f"{key},none"))
                         for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
        results[name] |= {"samples": output["n-samples"][name]["effective"], "data": source}
    return results


def paper_average(results: dict) -> tuple[float | None, list[str]]:
    """The paper's average over the accuracy tasks in `results`: acc for WinoGrande, acc_norm for the others."""
    names = [name for name in results if name != PERPLEXITY_TASK]
    if not names:
        return None, []
    return sum(results[n][PAPER_METRIC.get(n, "acc_norm")] for n in names) / len(names), names


def evaluate(loaded: LoadedModel, tasks: list[str], limit: int | None = None, batch_size: int = 8,
             ppl_segment_length: int = 2048, task_files: dict[str, Path] | None = None,
             ppl_segments: int | None = None) -> dict:
    """Accuracy tasks through lm-eval and `wikitext` perplexity; `limit` caps documents per task, and segments
    for wikitext unless `ppl_segments` is given. `task_files` points tasks at local files
    (`{"arc_challenge": Path(...)}`)."""
    tasks = list(dict.fromkeys(tasks))
    validate_tasks(tasks, task_files)
    validate_settings(limit, batch_size, ppl_segment_length, ppl_segments)
    start = time.perf_counter()
    accuracy_tasks = [name for name in tasks if name != PERPLEXITY_TASK]
    results = accuracy(loaded, accuracy_tasks, limit, batch_size, task_files) if accuracy_tasks else {}
    if PERPLEXITY_TASK in tasks:
        data = str((task_files or {}).get(PERPLEXITY_TASK, "wikitext2"))
        results[PERPLEXITY_TASK] = perplexity(loaded, data, ppl_segment_length, ppl_segments or limit,
                                              wikitext=True)
    average, average_tasks = paper_average(results)
    return {
        "tasks": {name: results[name] for name in tasks},
        "average": average,
        "average_tasks": average_tasks,
        "model": {"name": loaded.name, "weights_sha256": loaded.weights_sha256, "params": count_params(loaded.model),
                  "whole_model_params": count_all_params(loaded.model),  # a VLM's vision tower too
                  "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                  "device": str(input_device(loaded.model))},
        "limit": limit,
        "seconds": time.perf_counter() - start,
        "versions": versions(extra=("lm_eval", "datasets")),
    }


def summary_table(record: dict) -> Table:
    """One row per task: acc and acc_norm with their stderr, or perplexity; then the paper's average."""
    def score(value, stderr):
        if value is None:
            return ""
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    table = Table(title=f"{record['model']['name']} (limit {record['limit'] or 'none'})")
    table.add_column("task")
    for column in ("samples", "acc", "acc_norm", "perplexity"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, result in record["tasks"].items():
        if name == PERPLEXITY_TASK:
            table.add_row(name, f"{result['segments']} × {result['segment_length']}", "", "",
                          f"{result['perplexity']:.3f}")
        else:
            table.add_row(name, str(result["samples"]), score(result["acc"], result["acc_stderr"]),
                          score(result["acc_norm"], result["acc_norm_stderr"]), "")
    if record["average"] is not None:
        table.add_row("average (paper)", "", "", f"{record['average']:.4f}", "")
    return table
