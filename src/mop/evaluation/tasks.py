"""lm-eval's accuracy tasks on local files: each task is lm-eval's YAML config, unchanged (prompt, choices,
`process_docs`, target delimiter, metrics), with one thing replaced: the documents. When a local file is found
(`--task-file TASK=PATH`, then `$MOP_DATA_DIR/<file>`), it is converted to the Hugging Face schema the task
reads and handed to lm-eval as `custom_dataset`, under the split the task evaluates on; otherwise lm-eval loads
the hub data set as usual.
"""

from __future__ import annotations

import bz2
import functools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mop.data import load_rows, wikitext_file_rows
from mop.errors import MopError

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "wikitext")
PERPLEXITY_TASK = "wikitext"  # ours, not lm-eval's: token perplexity over fixed-length segments
PAPER_METRIC = {"winogrande": "acc"}  # the paper's average: acc for WinoGrande, acc_norm for the others


# ---------------------------------------------------------------- local files -> lm-eval's document schemas


def _record_error(path: Path, number: int, schema: str) -> MopError:
    return MopError(f"{path}: record {number} is not {schema}")


def read_arc(path: Path) -> list[dict]:
    """Any AI2 ARC split file (jsonl: id, question{stem, choices[{text, label}]}, answerKey) as `allenai/ai2_arc`
    rows: id, question, choices{text, label}, answerKey."""
    schema = "an ARC record (id, question.stem, question.choices[].text/label, answerKey)"
    docs = []
    for number, row in enumerate(load_rows(str(path))[0], 1):
        try:
            choices = row["question"]["choices"]
            doc = {"id": row["id"], "question": row["question"]["stem"],
                   "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                   "answerKey": row["answerKey"]}
        except (KeyError, TypeError):
            raise _record_error(path, number, schema) from None
        if not isinstance(doc["question"], str) or doc["answerKey"] not in doc["choices"]["label"]:
            raise _record_error(path, number, schema)
        docs.append(doc)
    return docs


def read_piqa(path: Path) -> list[dict]:
    """PIQA's `<split>.jsonl` (goal, sol1, sol2) with its `<split>-labels.lst` beside it (one 0/1 a line), or
    rows that carry their own `label`, as `baber/piqa` rows: goal, sol1, sol2, label (int)."""
    rows = load_rows(str(path))[0]
    labels_file = path.with_name(f"{path.stem}-labels.lst")
    labels = labels_file.read_text().split() if labels_file.is_file() else None
    if labels is not None and len(labels) != len(rows):
        raise MopError(f"{labels_file} has {len(labels)} labels for the {len(rows)} records of {path}")
    docs = []
    for number, row in enumerate(rows, 1):
        if labels is not None:
            label = labels[number - 1]
        else:
            label = row.get("label") if isinstance(row, dict) else None
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("goal", "sol1", "sol2"))
                and str(label) in ("0", "1")):
            raise _record_error(path, number,
                                f"a PIQA record (goal, sol1, sol2, and a 0/1 label in {labels_file.name})")
        docs.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)})
    return docs


def read_winogrande(path: Path) -> list[dict]:
    """WinoGrande as the Hugging Face Arrow cache file or as jsonl (sentence with one `_`, option1, option2,
    answer "1"/"2"), as `allenai/winogrande` rows."""
    if path.suffix == ".arrow":
        import datasets

        try:
            rows = datasets.Dataset.from_file(str(path)).to_list()
        except Exception as error:  # not an Arrow stream
            raise MopError(f"{path} cannot be read as an Arrow file: {type(error).__name__}") from None
    else:
        rows = load_rows(str(path))[0]
    docs = []
    for number, row in enumerate(rows, 1):
        doc = {k: row.get(k) for k in ("sentence", "option1", "option2", "answer")} if isinstance(row, dict) else {}
        if not (doc and all(isinstance(v, str) for v in doc.values()) and "_" in doc["sentence"]
                and doc["answer"] in ("1", "2")):
            raise _record_error(path, number,
                                'a WinoGrande record (sentence with "_", option1, option2, answer "1"/"2")')
        docs.append(doc)
    return docs


def split_hellaswag_context(context: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a HellaSwag context whose split was lost.

    ActivityNet contexts end in a lower-case sentence fragment (ctx_b, e.g. "he") after their last sentence end;
    WikiHow contexts end in a full sentence and have an empty ctx_b.
    """
    match = re.fullmatch(r"(.*[.!?]) ([^.!?]*[^.!?\s])", context)
    return (match[1], match[2]) if match else (context, "")


def read_hellaswag(path: Path) -> list[dict]:
    """HellaSwag in llama.cpp's text format (6 lines a task: `activity_label: ctx`, gold label, 4 endings; `.bz2`
    or plain) as `Rowan/hellaswag` rows: activity_label, ctx_a, ctx_b, ctx, endings, label."""
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise MopError(f"{path} cannot be read as HellaSwag text: {error}") from None
    if lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise MopError(f"{path}: {len(lines)} lines, not 6 per task (context, label, 4 endings)")
    docs = []
    for number, start in enumerate(range(0, len(lines), 6), 1):
        query, label, *endings = lines[start : start + 6]
        activity_label, separator, context = query.partition(": ")
        if not separator or label not in ("0", "1", "2", "3"):
            raise _record_error(path, number, "a HellaSwag task (`activity_label: context`, a label 0-3, 4 endings)")
        ctx_a, ctx_b = split_hellaswag_context(context)
        docs.append({"activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": context,
                     "endings": endings, "label": label})
    return docs


@dataclass(frozen=True)
class LocalData:
    file: str  # where it is looked for under MOP_DATA_DIR
    what: str  # for the user, when it is missing
    read: Callable[[Path], list[dict]]  # the file -> documents in the schema of lm-eval's task


LOCAL_DATA = {
    "arc_easy": LocalData("arc/ARC-Easy-Test.jsonl", "the ARC-Easy test split (AI2 ARC jsonl)", read_arc),
    "arc_challenge": LocalData("arc/ARC-Challenge-Test.jsonl", "the ARC-Challenge test split (AI2 ARC jsonl)",
                               read_arc),
    "hellaswag": LocalData("hellaswag/hellaswag_val_full.txt.bz2",
                           "HellaSwag validation in llama.cpp's text format", read_hellaswag),
    "piqa": LocalData("piqa/valid.jsonl", "PIQA valid.jsonl with valid-labels.lst beside it", read_piqa),
    "winogrande": LocalData("winogrande/winogrande-validation.arrow",
                            "WinoGrande (winogrande_xl) validation as an Arrow file or jsonl", read_winogrande),
}


def local_file(task: str, task_files: dict[str, Path] | None = None) -> Path | None:
    """The file `task` reads: the one named for it, else the one under MOP_DATA_DIR, else None (the hub)."""
    if task_files and task in task_files:
        return Path(task_files[task])
    data_dir = os.environ.get("MOP_DATA_DIR")
    if data_dir and (Path(data_dir) / LOCAL_DATA[task].file).is_file():
        return Path(data_dir) / LOCAL_DATA[task].file
    return None


# ---------------------------------------------------------------- lm-eval tasks


def _not_the_metadata_hint(record: logging.LogRecord) -> bool:
    """lm-eval points every task with a `custom_dataset` at its own CLI's --metadata option: not one of ours."""
    return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


@functools.cache
def task_manager():
    """lm-eval's task index over the folders of our tasks only (indexing all of lm-eval takes ~10 s)."""
    import lm_eval.tasks

    logging.getLogger("lm_eval.api.task").addFilter(_not_the_metadata_hint)
    root = Path(lm_eval.tasks.__file__).parent
    return lm_eval.tasks.TaskManager(include_defaults=False,
                                     include_path=[root / d for d in ("arc", "hellaswag", "piqa", "winogrande")])


def build_task(name: str, task_files: dict[str, Path] | None = None):
    """lm-eval's task `name` built from its own YAML config, reading the local file when there is one.
    Returns (the `ConfigurableTask`, where its documents came from)."""
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml  # what TaskManager itself reads task configs with

    manager = task_manager()
    path = local_file(name, task_files)
    if path is None:
        task = _hub_task(manager, name)
        return task, f"hub:{task.config.dataset_path}"
    rows = LOCAL_DATA[name].read(path)
    if not rows:
        raise MopError(f"{name}: {path} holds no documents")
    docs = datasets.Dataset.from_list(rows)
    config = load_yaml(manager.task_index[name].yaml_path)
    # zero-shot: only the split lm-eval evaluates on (test if the task has one, else validation) is needed
    eval_key = "test_split" if config.get("test_split") else "validation_split"
    split = config[eval_key]
    config |= {key: None for key in ("training_split", "validation_split", "test_split")}
    config |= {eval_key: split, "custom_dataset": lambda **metadata: datasets.DatasetDict({split: docs})}
    return manager.load(config)["tasks"][name], str(path.resolve())


def _hub_task(manager, name: str):
    try:
        return manager.load(name)["tasks"][name]
    except Exception as error:  # offline, unreachable hub, missing repo
        data = LOCAL_DATA[name]
        raise MopError(f"{name}: no local data and the Hugging Face hub failed ({type(error).__name__}); put "
                       f"{data.what} at $MOP_DATA_DIR/{data.file} or pass --task-file {name}=PATH") from None


def validate_tasks(tasks: list[str], task_files: dict[str, Path] | None = None) -> None:
    """Fail before a model loads: no task, an unknown task, a --task-file for an unknown task, a missing file or
    a wikitext file that is not a WikiText split."""
    if not tasks:
        raise MopError(f"no task given; choose from {', '.join(TASKS)}")
    for name in [*tasks, *(task_files or {})]:
        if name not in TASKS:
            raise MopError(f"unknown task {name}; choose from {', '.join(TASKS)}")
    for name, path in (task_files or {}).items():
        if not Path(path).is_file():
            raise MopError(f"--task-file {name}={path}: no such file")
        if name == PERPLEXITY_TASK:
            wikitext_file_rows(Path(path))  # a WikiText split, or the protocol cannot be followed: refused
