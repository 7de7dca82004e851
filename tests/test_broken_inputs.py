"""Broken files and impossible requests, fed to every command: truncated or corrupt weights, an invalid
config.json, empty, binary or wrong-field data files, an output under an existing file, an unknown plugin, method,
preset field or task, an unreachable target. Each ends in one line `mop: error: ...` (the reason named), exit
status 2, no traceback, and nothing written or changed."""

import json
import shutil
from pathlib import Path

import pytest

from mop.cli import main

GOOD = "@good"  # the tiny model; "@name" below is a file or directory of the case's workspace
FAST = {  # what keeps each command's valid part small (and its data local)
    "prune": ["--target", "0.2", "--calib-samples", "2", "--calib-max-length", "16", "--tune-steps", "0"],
    "finetune": ["--max-steps", "1", "--batch-size", "2", "--max-length", "64"],
    "eval": ["--tasks", "wikitext", "--limit", "1", "--ppl-segment-length", "32"],
    "bench": ["--runs", "3", "--warmup", "1", "--new-tokens", "2", "--prompt-tokens", "4", "--prefill-tokens", "8"],
    "run": ["--target", "0.2", "--calib-samples", "2", "--calib-max-length", "16", "--tune-steps", "0",
            "--recovery-steps", "1", "--recovery-batch-size", "2", "--recovery-max-length", "64", "--tasks",
            "wikitext", "--eval-limit", "1", "--eval-ppl-segment-length", "32", "--no-bench"],
}
FAST["compare"] = ["--methods", "mop,width", *FAST["run"]]
OUTPUT = {"prune": "--out", "finetune": "--out", "run": "--out", "compare": "--out", "eval": "--output",
          "bench": "--output"}
COMMANDS = list(OUTPUT)


def command(name: str, *extra: str, model: str = GOOD, output: str = "@result") -> list[str]:
    return [name, model, OUTPUT[name], output, *FAST[name], *extra]


CASES = {
    **{f"{name}-{broken}-model": (command(name, model=f"@{broken}"), reason)
       for name in COMMANDS
       for broken, reason in [("truncated", "cannot load the model"), ("corrupt", "cannot load the model"),
                              ("invalid-config", "config.json cannot be read"),
                              ("config-without-type", "config.json cannot be read")]},
    "bench-broken-baseline": (command("bench", "--baseline", "@truncated"), "cannot load the model"),
    **{f"{name}-under-a-file": (command(name, output="@file/result"), "is a file, not a directory")
       for name in COMMANDS},
    "check-under-a-file": (["check", GOOD, "--json", "@file/check.json"], "is a file, not a directory"),
    **{f"{name}-out-is-a-file": (command(name, output="@file"), "is a file; give a directory")
       for name in ("prune", "finetune", "run", "compare")},
    **{f"{name}-unknown-plugin": (command(name, "--plugin", "no_such_mop_plugin"), "cannot be imported")
       for name in COMMANDS},
    **{f"prune-calib-{kind}": (command("prune", "--calib", f"@{kind}.json"), reason)
       for kind, reason in [("empty", "cannot be parsed"), ("binary", "cannot be parsed"),
                            ("wrong-field", "rows need a 'text' field")]},
    **{f"finetune-data-{kind}": (command("finetune", "--data", f"@{kind}.json"), reason)
       for kind, reason in [("empty", "cannot be parsed"), ("binary", "cannot be parsed"),
                            ("wrong-field", "lacks the Alpaca fields")]},
    "finetune-kd-data-binary": (command("finetune", "--method", "kd", "--teacher", GOOD, "--kd-data", "@binary.txt"), "cannot be parsed"),
    "eval-task-file-empty": (command("eval", "--task-file", "wikitext=@empty.txt"), "holds no non-empty text"),
    "eval-task-file-binary": (command("eval", "--tasks", "piqa", "--task-file", "piqa=@binary.json"),
                              "cannot be parsed"),
    "eval-task-file-wrong-field": (command("eval", "--tasks", "arc_easy", "--task-file", "arc_easy=@wrong-field.json"),
                                   "is not an ARC record"),
    "run-recovery-data-wrong-field": (command("run", "--recovery-data", "@wrong-field.json"),
                                      "lacks the Alpaca fields"),
    "run-calib-wrong-field": (command("run", "--calib", "@wrong-field.json"), "rows need a 'text' field"),
    "prune-tune-data-wrong-field": (command("prune", "--tune-data", "@wrong-field.json"), "lacks the Alpaca fields"),
    "compare-calib-binary": (command("compare", "--calib", "@binary.txt"), "cannot be parsed"),
    "compare-recovery-data-empty": (command("compare", "--recovery-data", "@empty.json"), "cannot be parsed"),
    "prune-unknown-method": (command("prune", "--method", "sparsegpt"), "unknown pruning method"),
    "run-unknown-method": (command("run", "--method", "sparsegpt"), "unknown pruning method"),
    "compare-unknown-method": (command("compare", "--methods", "mop,nope"), "nope"),
    "compare-unknown-preset-field": (command("compare", "--methods", "x:nonsense=1"), "'nonsense=1' is not field=value"),
    "eval-unknown-task": (command("eval", "--tasks", "wikitext,nope"), "unknown task nope"),
    "run-unknown-task": (command("run", "--tasks", "nope"), "unknown task nope"),
    "compare-unknown-task": (command("compare", "--tasks", "nope"), "unknown task nope"),
    **{f"{name}-unreachable-target{'-' + method if method else ''}": (
        command(name, "--target", "0.97", *(["--method", method] if method else [])), "cannot be reached")
       for name in ("prune", "run") for method in ("", "shortgpt", "llm-pruner")},
    "run-unreachable-depth-target": (command("run", "--mode", "depth", "--target", "0.9"), "cannot be reached"),
    "compare-unreachable-target": (command("compare", "--methods", "depth,shortgpt,llm-pruner", "--target", "0.97"),
                                   "cannot be reached"),
}


def broken_models(good: Path, workspace: Path) -> None:
    """Copies of the tiny model with a broken file each."""
    breakages = {
        "truncated": ("model.safetensors", lambda data: data[: len(data) // 2]),
        "corrupt": ("model.safetensors", lambda data: data[:8] + b"{not a header" + data[21:]),
        "invalid-config": ("config.json", lambda data: data[: len(data) // 2]),
        "config-without-type": ("config.json", lambda data: json.dumps(
            {k: v for k, v in json.loads(data).items() if k not in ("model_type", "architectures")}).encode()),
    }
    for name, (file, corrupt) in breakages.items():
        shutil.copytree(good, workspace / name)
        (workspace / name / file).write_bytes(corrupt((good / file).read_bytes()))


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_input_is_refused_in_one_line(case, tiny_dirs, tmp_path, capsys):
    argv, reason = CASES[case]
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    broken_models(tiny_dirs["llama-gqa"], workspace)
    (workspace / "file").write_text("a file where a directory is needed")
    (workspace / "empty.json").write_text("")
    (workspace / "empty.txt").write_text("\n\n")
    (workspace / "binary.json").write_bytes(bytes(range(256)) * 8)
    (workspace / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (workspace / "wrong-field.json").write_text(json.dumps([{"question": "q?", "answer": "a"}] * 4))
    places = {GOOD: str(tiny_dirs["llama-gqa"])}
    argv = [places.get(arg) or arg.replace("@", f"{workspace}/") if "@" in arg else arg for arg in argv]
    before, model_before = snapshot(workspace), snapshot(tiny_dirs["llama-gqa"])

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("mop: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert reason in err, err
    assert snapshot(workspace) == before and snapshot(tiny_dirs["llama-gqa"]) == model_before
