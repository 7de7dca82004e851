"""`--recovery-dropout` of `mop run` and `mop compare`: the recovery's LoRA dropout, the paper's 0.05 by default,
recorded in the run's settings; a value outside [0, 1) is refused in one line."""

import pytest

import mop.compare
import mop.pipeline
import mop.report
from rich.table import Table
from conftest import SHARED_DATA
from mop.cli import main


@pytest.fixture
def configs(monkeypatch):
    """The PipelineConfig each `mop run` / `mop compare` would run, in place of running it."""
    seen = []
    monkeypatch.setattr(mop.pipeline, "run_pipeline", lambda model, config, out: seen.append(config))
    monkeypatch.setattr(mop.compare, "run_compare", lambda model, config, methods, out: seen.append(config))
    monkeypatch.setattr(mop.report, "results_table", lambda results, title: Table())  # nothing ran to tabulate
    return seen


def command(name: str, model, out, *extra: str) -> list[str]:
    methods = ["--methods", "mop,width"] if name == "compare" else []
    return [name, str(model), "--target", "0.2", "--out", str(out), *methods, "--no-bench",
            "--recovery-data", str(SHARED_DATA / "alpaca" / "alpaca_en_demo.json"), *extra]


@pytest.mark.parametrize("name", ["run", "compare"])
def test_recovery_dropout_reaches_the_recovery_settings(name, configs, tiny_dirs, tmp_path):
    assert main(command(name, tiny_dirs["llama-gqa"], tmp_path / "a")) == 0
    assert main(command(name, tiny_dirs["llama-gqa"], tmp_path / "b", "--recovery-dropout", "0")) == 0
    assert main(command(name, tiny_dirs["llama-gqa"], tmp_path / "c", "--recovery-dropout", "0.2")) == 0
    assert [config.recovery.lora.dropout for config in configs] == [0.05, 0.0, 0.2]
    assert configs[2].identity()["recovery"]["lora"]["dropout"] == 0.2  # a rerun with another dropout is refused


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "x"])
def test_recovery_dropout_out_of_range_is_refused(value, configs, tiny_dirs, tmp_path, capsys):
    assert main(command("run", tiny_dirs["llama-gqa"], tmp_path / "out", "--recovery-dropout", value)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mop: error:") and "--recovery-dropout" in err
    assert configs == [] and not (tmp_path / "out").exists()
