"""Evaluation: lm-eval's accuracy tasks on local files (`tasks`), WikiText-2 perplexity by the standard
protocol (`perplexity`), and the record of `mop eval` that joins them (`harness`)."""

from mop.evaluation.harness import accuracy, evaluate, paper_average, summary_table, validate_settings
from mop.evaluation.tasks import PAPER_METRIC, PERPLEXITY_TASK, TASKS, build_task, local_file, validate_tasks

__all__ = ["PAPER_METRIC", "PERPLEXITY_TASK", "TASKS", "accuracy", "build_task", "evaluate", "local_file",
           "paper_average", "summary_table", "validate_settings", "validate_tasks"]
