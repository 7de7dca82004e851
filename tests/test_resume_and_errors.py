"""Interrupted runs lose nothing (a killed `mop prune` resumes to bitwise the same result), and bad input gets a
one-line error, a non-zero exit, and leaves the output directory as it was."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mop.cli import main
from mop.models import load_model
from mop.pruning.search import Search, SearchConfig

SMALL = ["--calib-samples", "8", "--calib-max-length", "64", "--path-samples", "8", "--path-max-length", "64",
         "--tune-batch-size", "4", "--tune-micro-batch-size", "2", "--tune-max-length", "128"]


def prune_command(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mop.cli", "prune", str(model), "--out", str(out), *SMALL, *extra]


def iterations_logged(out: Path) -> int:
    try:
        return len(json.loads((out / "run.json").read_text())["iterations"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def kill_part_way(command: list[str], out: Path, total: int) -> None:
    """Run `command`, SIGKILL it once its run.json in `out` logs two iterations, and check that it had not done
    all `total`."""
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while iterations_logged(out) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= iterations_logged(out) < total, "the run was not interrupted part-way"


def assert_same_run(whole: Path, resumed: Path, names: list[str]) -> None:
    """The same run.json (but the seconds) and bitwise the same weights in every checkpoint of `names`."""
    run_whole, run_resumed = (json.loads((d / "run.json").read_text()) for d in (whole, resumed))
    strip = lambda run: [{k: v for k, v in r.items() if k != "seconds"} for r in run["iterations"]]
    assert strip(run_resumed) == strip(run_whole)  # same path, scores, indices, parameter counts
    assert run_resumed["targets"] == run_whole["targets"]
    for name in names:
        weights = sorted(p.name for p in (whole / name).glob("*.safetensors"))
        assert weights
        for file in weights:
            assert (resumed / name / file).read_bytes() == (whole / name / file).read_bytes(), (name, file)
    assert not list(resumed.glob("*.partial"))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("repair", [[], ["--compensation", "lstsq"]], ids=["plain", "compensated"])
def test_killed_run_resumes_to_bitwise_identical_result(tiny_dirs, tmp_path, repair):
    """kl criterion with short tuning (slow enough to be killed between iterations), two targets; with
    compensation, the replayed iterations compute their repairs again, bitwise."""
    args = ["--target", "0.2", "--target", "0.55", "--path-criterion", "kl", "--tune-steps", "1", "--seed", "3",
            *repair]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run(prune_command(tiny_dirs["llama-gqa"], whole, *args), check=True, capture_output=True)
    kill_part_way(prune_command(tiny_dirs["llama-gqa"], resumed, *args), resumed, iterations_logged(whole))
    subprocess.run(prune_command(tiny_dirs["llama-gqa"], resumed, *args), check=True, capture_output=True)
    assert_same_run(whole, resumed, ["target-20", "target-55"])


REPAIRED = {"compensation": "lstsq", "calib": "wikitext2-valid", "calib_samples": 8, "calib_max_length": 64,
            "seed": 3}


def repaired_run(directory: Path, out: Path, targets: list[float]) -> None:
    Search(load_model(str(directory)), SearchConfig(targets=targets, **REPAIRED), out).run()


def count_repairs(monkeypatch) -> list[int]:
    """A list that grows by one for every repair computed from here on."""
    import mop.pruning.compensation as compensation
    import mop.pruning.search as search

    calls, fit = [], compensation.repair_for
    for module in (compensation, search):  # a cut's repair, a width candidate's
        monkeypatch.setattr(module, "repair_for", lambda *args, **kwargs: calls.append(1) or fit(*args, **kwargs))
    return calls


def test_repaired_run_resumes_from_its_saved_weights(tiny_dirs, tmp_path, monkeypatch):
    """A repaired run extended to a higher target loads the weights it saved after its last iteration instead of
    repairing its logged iterations again (a calibration pass each): it computes the new iterations' repairs only,
    and ends bitwise where an uninterrupted run does."""
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    repaired_run(tiny_dirs["llama-gqa"], whole, [0.2, 0.45])
    repaired_run(tiny_dirs["llama-gqa"], extended, [0.2])
    logged = iterations_logged(extended)
    assert (extended / "resume.safetensors").is_file() and 2 <= logged < iterations_logged(whole)
    repairs = count_repairs(monkeypatch)
    repaired_run(tiny_dirs["llama-gqa"], extended, [0.2, 0.45])
    assert len(repairs) == iterations_logged(whole) - logged
    assert_same_run(whole, extended, ["target-20", "target-45"])


@pytest.mark.parametrize("case", ["target added below", "saved weights gone"])
def test_repaired_run_replays_its_repairs_where_it_must(tiny_dirs, tmp_path, monkeypatch, case):
    """A target added below the saved iteration needs the weights of its own iteration: the replay repairs the
    iterations up to it, then cuts bare up to the saved weights. Without them, it repairs every iteration again.
    Either way bitwise the uninterrupted run."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    repaired_run(tiny_dirs["llama-gqa"], whole, [0.2, 0.45])
    first = json.loads((whole / "run.json").read_text())["targets"]["target-20"]["iteration"]
    repaired_run(tiny_dirs["llama-gqa"], resumed, [0.2, 0.45] if case == "saved weights gone" else [0.45])
    if case == "saved weights gone":
        (resumed / "resume.safetensors").unlink()
        shutil.rmtree(resumed / "target-20")  # a checkpoint to write again, at iteration `first`
    repairs = count_repairs(monkeypatch)
    repaired_run(tiny_dirs["llama-gqa"], resumed, [0.2, 0.45])
    assert len(repairs) == (first if case == "target added below" else iterations_logged(whole))
    assert_same_run(whole, resumed, ["target-20", "target-45"])


def test_rerunning_a_finished_run_changes_nothing(tiny_dirs, tmp_path):
    args = [str(tiny_dirs["mistral"]), "--out", str(tmp_path), "--target", "0.25", *SMALL]
    assert main(["prune", *args]) == 0
    before = snapshot(tmp_path)
    assert main(["prune", *args]) == 0
    after = snapshot(tmp_path)
    log_before, log_after = before.pop("mop.log"), after.pop("mop.log")  # the log keeps every invocation
    assert after == before and log_after.startswith(log_before) and log_after.count(b"==== ") == 2


def test_reopening_a_run_removes_unlisted_checkpoints_only(tiny_dirs, tmp_path):
    """A checkpoint a kill left unlisted is removed on the next run; a user's folder whose name merely starts
    like one (a recovered `target-25-kd/`) stays."""
    args = ["prune", str(tiny_dirs["mistral"]), "--out", str(tmp_path), "--target", "0.25", *SMALL]
    assert main(args) == 0
    for name in ("target-25-kd", "target-40", "speedup-150"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
    assert main(args) == 0
    assert (tmp_path / "target-25-kd" / "model.safetensors").read_bytes() == b"weights"
    assert not (tmp_path / "target-40").exists() and not (tmp_path / "speedup-150").exists()


@pytest.fixture
def corrupt_dirs(tiny_dirs, tmp_path) -> dict[str, Path]:
    """A directory without config.json, one with an unreadable config, one with truncated weights."""
    dirs = {name: tmp_path / name for name in ("empty", "bad-config", "bad-weights")}
    for name, directory in dirs.items():
        directory.mkdir()
        if name != "empty":
            for file in tiny_dirs["llama-gqa"].iterdir():
                (directory / file.name).write_bytes(file.read_bytes())
    (dirs["bad-config"] / "config.json").write_text("{not json")
    weights = dirs["bad-weights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return dirs


def run_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mop: error: "), (code, err)
    return err[0]


@pytest.mark.parametrize("target, message", [("1.5", "a ratio in (0, 1)"), ("0", "a ratio in (0, 1)"),
                                             ("-0.2", "a ratio in (0, 1)"), ("0.97", "cannot be reached")])
def test_bad_targets(tiny_dirs, tmp_path, capsys, target, message):
    out = tmp_path / "out"
    assert message in run_error(capsys, "prune", str(tiny_dirs["llama-gqa"]), "--target", target, "--out", str(out))
    assert not out.exists()


def test_unreachable_target_depends_on_mode(tiny_dirs, tmp_path, capsys):
    """Depth mode keeps two of six layers (4 × 30,848 of 217,920 parameters removed, at most 0.5662), so 0.7 is
    out of its reach but not of the mixture's."""
    line = run_error(capsys, "prune", str(tiny_dirs["llama-gqa"]), "--target", "0.7", "--mode", "depth",
                     "--out", str(tmp_path / "out"))
    assert line == "mop: error: target 0.7 cannot be reached in mode depth: at most 0.5662 (of all parameters)"
    assert 4 * 30_848 / 217_920 == pytest.approx(0.5662, abs=1e-4)
    search = Search(load_model(str(tiny_dirs["llama-gqa"])), SearchConfig(targets=[0.7]), tmp_path / "mixture")
    assert search.goal(0.7) == pytest.approx(0.3 * 217_920)  # accepted: the mixture goes on with width steps


@pytest.mark.parametrize("name, message", [("missing", "not found"), ("empty", "no config.json"),
                                           ("bad-config", "cannot be read"), ("bad-weights", "cannot load")])
def test_missing_or_corrupt_model(corrupt_dirs, tmp_path, capsys, name, message):
    model = corrupt_dirs.get(name, tmp_path / "does-not-exist")
    out = tmp_path / "out"
    assert message in run_error(capsys, "prune", str(model), "--target", "0.2", "--out", str(out))
    assert not out.exists()


def test_unsupported_architecture(tiny_dirs, tmp_path, capsys):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    line = run_error(capsys, "prune", str(model), "--target", "0.2", "--out", str(tmp_path / "out"))
    assert "GPT2LMHeadModel" in line and "LlamaForCausalLM" in line


@pytest.mark.parametrize("option, content", [
    ("--calib", [{"question": "no text field"}]),
    ("--calib", {"not": "a list"}),
    ("--tune-data", [{"text": "no instruction or output"}]),
])
def test_data_file_with_wrong_schema(tiny_dirs, tmp_path, capsys, option, content):
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(content))
    out = tmp_path / "out"
    line = run_error(capsys, "prune", str(tiny_dirs["llama-gqa"]), "--target", "0.2", "--path-criterion", "kl",
                     option, str(data_file), "--out", str(out), *SMALL)
    assert str(data_file) in line
    assert not out.exists()


def test_output_directory_of_another_run_is_left_untouched(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dirs["qwen2"]), "--target", "0.2", "--seed", "0", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()  # the finished run's progress bars
    before = snapshot(out)
    line = run_error(capsys, "prune", str(tiny_dirs["qwen2"]), "--target", "0.2", "--seed", "1", "--out", str(out),
                     *SMALL)
    assert "holds a different run" in line and "seed" in line
    line = run_error(capsys, "prune", str(tiny_dirs["mistral"]), "--target", "0.2", "--out", str(out), *SMALL)
    assert "holds a different run" in line and "model_sha256" in line
    assert snapshot(out) == before


def test_non_empty_directory_without_a_run_is_refused(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = run_error(capsys, "prune", str(tiny_dirs["qwen2"]), "--target", "0.2", "--out", str(out), *SMALL)
    assert "holds no mop run" in line
    assert snapshot(out) == {"notes.txt": b"mine"}
