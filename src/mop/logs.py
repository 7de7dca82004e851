"""Where a command's messages go. The terminal shows mop's own log lines, progress bars and tables; the
libraries' chatter (the logging of transformers, datasets, lm-eval, accelerate, peft, httpx, ... and
`warnings.warn`) goes to the command's log file only, unless `-v` shows it on the terminal too.

The log file is written when the command ends (with the traceback if it failed unexpectedly), not as it runs:
a command refused for bad input must leave its output location as it found it, and before the command has
checked that location, the log file has nowhere safe to go.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import transformers
from tqdm import tqdm

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TERMINAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
# libraries that print through a stderr handler of their own: their records are sent up to the root logger instead
OWN_HANDLERS = ("transformers", "datasets", "huggingface_hub", "torch")


def is_ours(record: logging.LogRecord) -> bool:
    return record.name == "mop" or record.name.startswith("mop.")


class LogFile(logging.Handler):
    """Every record of one command, held in memory until `write` appends them to the log file."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def write(self, path: Path, argv: list[str], traceback: str | None = None) -> None:
        """Append this command's records (and `traceback`) to `path`, under a header naming the command."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()}): mop {' '.join(argv)}\n")
            log.writelines(line + "\n" for line in self.lines)
            if traceback:
                log.write(traceback)


def _datasets():
    """The `datasets` package if installed (lm-eval needs it; `mop.data` uses it for the hub), imported now so
    that its stderr handler exists and can be taken away."""
    if importlib.util.find_spec("datasets") is None:
        return None
    import datasets

    return datasets


@contextmanager
def routed(verbose: bool) -> Iterator[LogFile]:
    """For the duration of a command: every library's records to the root logger, ours to the terminal (and
    everyone's with `verbose`), all of them to the returned LogFile; library progress bars off unless
    `verbose`. The previous logging state is restored afterwards."""
    datasets = _datasets()
    for name in OWN_HANDLERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    bars = {transformers.utils.logging: transformers.utils.logging.is_progress_bar_enabled()}
    if datasets is not None:
        bars[datasets.utils.logging] = datasets.utils.logging.is_progress_bar_enabled()
    for library in bars:
        _show_bars(library, verbose)

    log_file = LogFile()
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter(TERMINAL_FORMAT))
    if not verbose:
        terminal.addFilter(is_ours)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(terminal)
    root.addHandler(log_file)
    logging.captureWarnings(True)
    try:
        yield log_file
    finally:
        logging.captureWarnings(False)
        root.removeHandler(log_file)
        root.removeHandler(terminal)
        root.setLevel(level)
        for library, enabled in bars.items():
            _show_bars(library, enabled)


def _show_bars(library_logging, enabled: bool) -> None:
    """Switch the progress bars of transformers or datasets (their `utils.logging` module) on or off."""
    if enabled:
        library_logging.enable_progress_bar()
    else:
        library_logging.disable_progress_bar()


class LoggedBar(tqdm):
    """A library's progress bar drawn nowhere: when it closes, its final state ("100%|...| 40/40 [...]") is one
    record of the library's logger, so it reaches the log file (and the terminal only with `-v`)."""

    logger_name = "library"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "file": io.StringIO(), "mininterval": math.inf})

    def close(self) -> None:
        if not self.disable:
            logging.getLogger(self.logger_name).info("%s", self)
        super().close()


@contextmanager
def bars_to_log(module: ModuleType) -> Iterator[None]:
    """While inside: the tqdm bars that `module` (a library module that did `from tqdm import tqdm`) draws go to
    the log as `LoggedBar`s, under the module's logger name."""
    drawn = module.tqdm
    module.tqdm = type("LoggedBar", (LoggedBar,), {"logger_name": module.__name__})
    try:
        yield
    finally:
        module.tqdm = drawn
