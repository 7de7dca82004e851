"""Quiet by default: the terminal shows mop's own messages, bars and tables; the libraries' log records and
`warnings.warn` go to the command's log file (`-v` shows them too); an unexpected error is one line on the
terminal and a traceback in the log file."""

import logging
import warnings

import datasets
import pytest
import transformers

import mop.evaluation
import mop.latency
from mop.cli import main

LM_EVAL_WARNING = "`pretrained` model kwarg is not of type `str`"  # lm-eval, on every in-memory model
TINY_BENCH = ["--runs", "3", "--warmup", "1", "--prompt-tokens", "4", "--new-tokens", "2", "--prefill-tokens", "8"]


def eval_command(tiny_dirs, output, *extra) -> list[str]:
    return ["eval", str(tiny_dirs["llama-gqa"]), "--tasks", "winogrande", "--limit", "2", "--output", str(output),
            *extra]


def test_eval_prints_no_library_warnings_and_logs_them(tiny_dirs, tmp_path, capsys):
    output = tmp_path / "eval.json"
    assert main(eval_command(tiny_dirs, output)) == 0
    terminal = capsys.readouterr()
    log = (tmp_path / "eval.log").read_text()
    assert "winogrande" in terminal.out  # our table
    assert LM_EVAL_WARNING not in terminal.err and "WARNING" not in terminal.err
    assert f"WARNING lm_eval.models.huggingface: {LM_EVAL_WARNING}" in log
    assert log.startswith("==== ") and f"mop eval {tiny_dirs['llama-gqa']}" in log.splitlines()[0]


def test_verbose_shows_library_messages_too(tiny_dirs, tmp_path, capsys):
    output = tmp_path / "eval.json"
    assert main(eval_command(tiny_dirs, output, "-v")) == 0
    assert LM_EVAL_WARNING in capsys.readouterr().err
    assert LM_EVAL_WARNING in (tmp_path / "eval.log").read_text()


def test_every_library_route_goes_to_the_log(tiny_dirs, tmp_path, capsys, monkeypatch):
    """transformers and datasets print through stderr handlers of their own, warnings.warn through
    warnings.showwarning: all of it goes to the log only, and datasets' progress bars are off meanwhile."""
    evaluate, seen = mop.evaluation.evaluate, {}

    def chatty(*args, **kwargs):
        transformers.utils.logging.get_logger("transformers.chatty").warning("transformers says hi")
        datasets.utils.logging.get_logger("datasets.chatty").warning("datasets says hi")
        logging.getLogger("accelerate.chatty").info("accelerate says hi")
        warnings.warn("a library warns", UserWarning)
        logging.getLogger("mop.chatty").info("mop says hi")
        seen["datasets bars"] = datasets.utils.logging.is_progress_bar_enabled()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(mop.evaluation, "evaluate", chatty)
    assert main(eval_command(tiny_dirs, tmp_path / "eval.json")) == 0
    err = capsys.readouterr().err
    log = (tmp_path / "eval.log").read_text()
    for message in ("transformers says hi", "datasets says hi", "accelerate says hi", "a library warns"):
        assert message in log and message not in err
    assert "INFO mop.chatty: mop says hi" in err and "mop says hi" in log  # ours: on the terminal too
    assert seen["datasets bars"] is False and datasets.utils.logging.is_progress_bar_enabled()  # restored after


@pytest.mark.parametrize("verbose", [False, True])
def test_unexpected_error_is_one_line_and_a_logged_traceback(verbose, tiny_dirs, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch deep inside torch\nsecond line of the message")

    monkeypatch.setattr(mop.latency, "benchmark", broken)
    output = tmp_path / "bench.json"
    code = main(["bench", str(tiny_dirs["llama-gqa"]), "--output", str(output), *TINY_BENCH, *(["-v"] * verbose)])
    assert code == 1
    err = capsys.readouterr().err
    log = tmp_path / "bench.log"
    assert err.splitlines()[-1] == (f"mop: error: RuntimeError: shape mismatch deep inside torch (unexpected; the "
                                    f"traceback is in {log})")
    assert ("Traceback" in err) is verbose
    assert "Traceback (most recent call last)" in log.read_text() and "second line of the message" in log.read_text()
    assert not output.exists()


def test_prune_logs_into_its_run_directory_and_a_refused_command_writes_no_log(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    prune = ["prune", str(tiny_dirs["llama-gqa"]), "--target", "0.2", "--calib-samples", "4", "--calib-max-length",
             "32", "--out", str(out)]
    assert main(prune) == 0
    first = (out / "mop.log").read_text()
    assert first.startswith("==== ") and "mop prune" in first
    assert main([*prune, "--seed", "1"]) == 2  # another run's directory: refused, its log left as it is
    assert "holds a different run" in capsys.readouterr().err
    assert (out / "mop.log").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
