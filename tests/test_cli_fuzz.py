"""The command line under random input: 240 seeded argument sets, valid and invalid, over every command, run
in-process on tiny models. A valid set must succeed; an invalid one must fail with exit status 2 and one line
`mop: error: ...`; none may raise, print a traceback, or leave a half-written or changed output behind."""

import argparse
import json
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from mop import cli

CASES = int(os.environ.get("MOP_FUZZ_CASES", 240))
MODEL = "@model"  # replaced by the tiny model's directory
BASELINE = "@baseline"  # another tiny model sharing its tokenizer
OUT = "@out"  # replaced by the case's output path (in its own directory)

INTEGER_TYPOS = ["x", "1.5", "", "1e3", "nan"]
NOT_POSITIVE = ["0", "-1", "-7", *INTEGER_TYPOS]
BAD_RATIOS = ["0", "1", "1.5", "-0.2", "nan", "inf", "x"]
BAD_FLOATS = ["0", "-1", "-3e-4", "nan", "inf", "x"]

# command → option → (valid values, invalid values); None as the valid values: a flag without a value.
# The valid values keep every run tiny (a few calibration prompts, one training step, two documents).
SEARCH = {
    "--target": (["0.2", "0.25"], BAD_RATIOS),
    "--mode": (["mop", "depth", "width"], ["both", ""]),
    "--path-criterion": (["random"], ["coin"]),
    "--layer-criterion": (["third_to_last", "block_influence"], ["last"]),
    "--width-criterion": (["amp"], ["magnitude"]),
    "--method": (["mop"], ["sparsegpt"]),
    "--calib-samples": (["2", "4"], NOT_POSITIVE),
    "--calib-max-length": (["16", "32"], NOT_POSITIVE),
    "--batch-size": (["1", "2"], NOT_POSITIVE),
    "--path-samples": (["2"], NOT_POSITIVE),
    "--path-max-length": (["16"], NOT_POSITIVE),
    "--ppl-segment-length": (["32"], ["1", "0", "-2", "x"]),
    "--ppl-segments": (["1"], NOT_POSITIVE),
    "--tune-steps": (["0"], ["-1", "-10", *INTEGER_TYPOS]),
    "--tune-batch-size": (["2"], NOT_POSITIVE),
    "--tune-micro-batch-size": (["1"], NOT_POSITIVE),
    "--tune-max-length": (["32"], NOT_POSITIVE),
    "--calib": (["alpaca", "wikitext2"], ["@missing.json"]),
    "--device": (["cpu"], ["gpu", "cuda:x", ""]),
    "--dtype": (["float32"], ["float8", "fp32"]),
}
OPTIONS = {
    "prune": {**SEARCH, "--seed": (["0", "3"], ["x", "-1", "1.5", "4294967296"])},
    "finetune": {
        "--max-steps": (["1"], NOT_POSITIVE), "--epochs": (["0.001"], BAD_FLOATS),
        "--batch-size": (["2"], NOT_POSITIVE), "--micro-batch-size": (["1", "2"], NOT_POSITIVE),
        "--lr": (["3e-4", "0.01"], BAD_FLOATS), "--max-length": (["96"], NOT_POSITIVE),
        "--rank": (["2", "4"], NOT_POSITIVE), "--alpha": (["4", "10"], NOT_POSITIVE),
        "--dropout": (["0", "0.05"], ["1", "2", "-0.1", "nan", "x"]), "--save-every": (["1", "5"], NOT_POSITIVE),
        "--seed": (["0", "1"], ["x", "-1"]), "--method": (["sft"], ["dpo"]), "--data": ([], ["@missing.json"]),
        "--trainable": (["lora", "full"], ["x", "all"]),
        "--kd-temperature": (["1.0"], BAD_FLOATS), "--no-activation-checkpointing": (None, []),
        "--device": (["cpu"], ["gpu"]), "--dtype": (["float32"], ["half"]),
    },
    "eval": {
        "--tasks": (["winogrande", "arc_easy", "arc_easy,winogrande"], ["", "arc_hard", "wikitext,nope"]),
        "--limit": (["2"], NOT_POSITIVE), "--batch-size": (["2"], NOT_POSITIVE),
        "--ppl-segment-length": (["32", "64"], ["1", "0", "x"]), "--ppl-segments": (["1", "2"], NOT_POSITIVE),
        "--task-file": ([], ["nonsense", "=x", "arc_easy=@missing.json", "nope=@missing.json"]),
        "--device": (["cpu"], ["gpu"]),
    },
    "bench": {
        "--runs": (["3"], NOT_POSITIVE), "--warmup": (["1"], ["-1", "x", "3", "2"]),
        "--prompt-tokens": (["4", "6"], NOT_POSITIVE), "--new-tokens": (["2", "3"], ["1", "0", "-1", "x"]),
        "--prefill-tokens": (["8"], NOT_POSITIVE), "--baseline": ([BASELINE], ["@missing-model"]),
        "--device": (["cpu"], ["gpu"]), "--dtype": (["float32"], ["int8"]),
    },
    "run": {
        **SEARCH, "--seeds": (["0", "1"], ["x", "0,0", "-1", "0,,x"]),
        "--no-recovery": (None, []),
        "--recovery-steps": (["1"], NOT_POSITIVE), "--recovery-epochs": ([], BAD_FLOATS),
        "--recovery-batch-size": (["2"], NOT_POSITIVE), "--recovery-micro-batch-size": (["1", "2"], NOT_POSITIVE),
        "--recovery-max-length": (["96"], NOT_POSITIVE), "--recovery-method": (["sft"], ["rl"]),
        "--recovery-trainable": (["lora", "full"], ["lora,full"]),
        "--tasks": (["winogrande"], ["", "arc_hard"]), "--eval-limit": (["2"], NOT_POSITIVE),
        "--eval-batch-size": (["2"], NOT_POSITIVE), "--eval-ppl-segment-length": (["32"], ["1", "x"]),
        "--eval-ppl-segments": (["1"], NOT_POSITIVE), "--bench-runs": (["3"], NOT_POSITIVE),
        "--bench-warmup": (["1"], ["-1", "x"]),
    },
}
# what a valid set of each command always has: the required options and the settings that keep it tiny (8 Alpaca
# rows to train on; no wikitext, whose perplexity tokenizes the whole test set; `mop run` times nothing, since
# its latency settings are the protocol's 128 tokens and 512-token prefill)
BASE = {
    "prune": ["--target", "0.2", "--out", OUT, "--calib-samples", "4", "--calib-max-length", "32", "--tune-steps", "0"],
    "finetune": ["--out", OUT, "--data", "@alpaca.json", "--max-steps", "1", "--batch-size", "2", "--max-length", "96"],
    "eval": ["--tasks", "winogrande", "--output", OUT, "--limit", "2"],
    "bench": ["--output", OUT, "--runs", "3", "--warmup", "1", "--new-tokens", "2", "--prompt-tokens", "4",
              "--prefill-tokens", "8"],
    "run": ["--target", "0.2", "--out", OUT, "--calib-samples", "4", "--calib-max-length", "32", "--tune-steps", "0",
            "--recovery-data", "@alpaca.json", "--recovery-steps", "1", "--recovery-batch-size", "2",
            "--recovery-max-length", "96", "--tasks", "winogrande", "--eval-limit", "2", "--no-bench"],
}
REQUIRED = {"prune": ["--target", "--out"], "finetune": ["--out"], "eval": ["--tasks", "--output"],
            "bench": ["--output"], "run": ["--target", "--out"]}
# the share of valid sets per command: low for the slow commands, so the whole test stays near a minute
VALID_SHARE = {"prune": 0.4, "finetune": 0.3, "eval": 0.3, "bench": 0.4, "run": 0.25}
# invalid values the option types accept, refused once the command checks its settings (some after a model loads)
LATE_ERRORS = {
    "prune": [["--target", "0.97"], ["--mode", "depth", "--target", "0.8"], ["--calib", "@empty.json"]],
    "finetune": [["--method", "kd"], ["--data", "@empty.json"]],
    "eval": [["--task-file", "arc_easy=@empty.json", "--tasks", "arc_easy"]],
    "bench": [["--runs", "4", "--warmup", "3"], ["--prompt-tokens", "3000"]],
    "run": [["--seeds", "1,1"], ["--tasks", "arc_challenge"]],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the tiny models' matmuls gain nothing from more, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _with(argv: list[str], option: str, value: str | None) -> list[str]:
    """`argv` with `option` set to `value` (replacing an earlier value, unless the option repeats)."""
    if option in argv and option not in ("--target", "--task-file"):
        index = argv.index(option)
        del argv[index : index + 2]
    return argv + ([option] if value is None else [option, value])


def make_case(rng: random.Random, command: str) -> dict:
    """A command line with placeholders, whether it is valid, and what its output holds beforehand."""
    argv = [command, MODEL, *BASE[command]]
    for option in rng.sample(list(OPTIONS[command]), rng.randint(0, 3)):  # some optional settings, all valid
        valid, _ = OPTIONS[command][option]
        if valid is None:
            argv = _with(argv, option, None)
        elif valid:
            argv = _with(argv, option, rng.choice(valid))
    if rng.random() < 0.1:
        argv.append("--verbose")
    valid = rng.random() < VALID_SHARE[command]
    if not valid:
        mistake = rng.choice(["value", "value", "value", "late", "missing", "unknown", "plugin", "model"])
        if mistake == "value":
            option = rng.choice([o for o, (_, bad) in OPTIONS[command].items() if bad])
            argv = _with(argv, option, rng.choice(OPTIONS[command][option][1]))
        elif mistake == "late":
            for option, value in zip(*[iter(rng.choice(LATE_ERRORS[command]))] * 2):
                argv = _with(argv, option, value)
        elif mistake == "missing":
            option = rng.choice(REQUIRED[command])
            while option in argv:
                index = argv.index(option)
                del argv[index : index + 2]
        elif mistake == "unknown":
            argv.insert(rng.randint(1, len(argv)), rng.choice(["--bogus", "--target-ratio=0.2", "-x", "extra"]))
        elif mistake == "plugin":
            argv += ["--plugin", rng.choice(["no_such_mop_plugin", "mop.no_such_module", ""])]
        else:
            argv[1] = rng.choice(["@missing-model", "@empty-dir", "not/a-hub-id/at-all"])
    output = "fresh"
    if rng.random() < 0.3:
        output = "existing"  # a file (--output) or a foreign directory (--out) that a failure must leave as it is
    if output == "existing" and command in ("prune", "finetune", "run"):
        valid = False  # a directory that holds something else is refused
    return {"argv": argv, "valid": valid, "output": output}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root`: file contents, None for a directory."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


ALPACA_ROWS = json.dumps(json.loads((SHARED_DATA / "alpaca" / "alpaca_en_demo.json").read_text())[:8])


def materialise(case: dict, workspace: Path, tiny_dirs: dict[str, Path]) -> list[str]:
    """The case's command line with real paths; its output prepared as the case says."""
    command = case["argv"][0]
    out = workspace / ("result.json" if command in ("eval", "bench") else "out")
    if case["output"] == "existing":
        if command in ("eval", "bench"):
            out.write_text('{"previous": "record"}')
        else:
            out.mkdir()
            (out / "notes.txt").write_text("not a mop run")
    (workspace / "empty.json").write_text("[]")
    (workspace / "alpaca.json").write_text(ALPACA_ROWS)
    (workspace / "empty-dir").mkdir()
    places = {MODEL: str(tiny_dirs["llama-gqa"]), BASELINE: str(tiny_dirs["mistral"]), OUT: str(out)}

    def real(arg: str) -> str:
        if arg in places:
            return places[arg]
        return arg.replace("@", f"{workspace}/") if "@" in arg else arg

    return [real(arg) for arg in case["argv"]]


def test_every_numeric_option_has_a_checked_range():
    """Each int or float option of every command gets its allowed values from OPTION_VALUES (a new option
    declared with type=int or float and no entry fails here)."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.type not in (int, float), f"mop {name} {action.option_strings}: no range in OPTION_VALUES"


@pytest.mark.parametrize("index", range(CASES))
def test_random_command_lines(index, tiny_dirs, tmp_path, capsys):
    case = make_case(random.Random(f"mop-cli-fuzz-{index}"), list(OPTIONS)[index % len(OPTIONS)])
    workspace = tmp_path / "case"
    workspace.mkdir()
    argv = materialise(case, workspace, tiny_dirs)
    before = snapshot(workspace)

    code = cli.main(argv)  # an uncaught exception fails the test

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mop: error:")]
    assert "Traceback" not in err and len(errors) <= 1, err
    assert code == (0 if case["valid"] else 2), f"{argv}\n{err}"
    if code == 2:
        assert len(errors) == 1 and err.rstrip().endswith(errors[0])  # one line, the last
        assert snapshot(workspace) == before  # nothing written, nothing changed
    assert not [p for p in workspace.rglob("*.partial")]
