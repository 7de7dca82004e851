"""`mop run` on a tiny model: every stage's output exists, the report's numbers are the stages' numbers, a rerun
redoes nothing, a new seed only adds its own stages, and another run's directory is refused."""

import json
import re
import statistics
from dataclasses import asdict

import pytest

import mop.pipeline
from mop.cli import main
from mop.errors import MopError
from mop.latency import LatencySettings
from mop.pipeline import PipelineConfig, run_pipeline
from mop.pruning.search import SearchConfig
from mop.report import markdown
from mop.training import FinetuneConfig, LoraSettings

SEARCH = dict(calib_samples=8, calib_max_length=64)


def tiny_config(seeds, **changes) -> PipelineConfig:
    settings = dict(
        search=SearchConfig(targets=[0.2, 0.4], **SEARCH), seeds=seeds,
        recovery=FinetuneConfig(max_steps=2, lora=LoraSettings(batch_size=4, micro_batch_size=2, max_length=96)),
        tasks=["arc_easy", "winogrande", "wikitext"], eval_limit=4, eval_batch_size=4, ppl_segment_length=128,
        latency=LatencySettings(runs=3, warmup=1, new_tokens=4, prefill_tokens=16))
    return PipelineConfig(**{**settings, **changes})


@pytest.fixture
def stage_calls(monkeypatch) -> list[str]:
    """The outputs of the stages that actually computed something."""
    calls, stage = [], mop.pipeline.stage

    def counting(output, compute, what):
        return stage(output, lambda: (calls.append(output.name), compute())[1], what)

    monkeypatch.setattr(mop.pipeline, "stage", counting)
    return calls


def test_run_writes_every_stage_and_a_report_of_their_numbers(tiny_dirs, tmp_path, stage_calls):
    out = tmp_path / "run"
    results = run_pipeline(str(tiny_dirs["llama-gqa"]), tiny_config([0]), out)
    assert sorted(stage_calls) == ["eval.json", "target-20.json", "target-20.json", "target-40.json", "target-40.json"]
    for name in ("target-20", "target-40"):
        recovered = json.loads((out / "seed-0" / "recovered" / name / "mop.json").read_text())
        assert recovered["finetune"]["steps"] == 2
        evaluation = json.loads((out / "seed-0" / "eval" / f"{name}.json").read_text())
        latency = json.loads((out / "seed-0" / "bench" / f"{name}.json").read_text())
        row = results["checkpoints"][name][0]
        assert row["path"] == recovered["path"] and row["compression"] == recovered["compression"]
        assert row["compression"] == 1 - row["params"] / recovered["original_params"]
        assert row["tasks"] == {"arc_easy": evaluation["tasks"]["arc_easy"]["acc_norm"],
                                "winogrande": evaluation["tasks"]["winogrande"]["acc"]}
        assert row["average"] == pytest.approx(statistics.mean(row["tasks"].values()))
        assert row["perplexity"] == evaluation["tasks"]["wikitext"]["perplexity"]
        assert row["speedup"] == latency["speedup"]["mean"]
    report = (out / "report.md").read_text()
    assert "| target-40 |" in report and "| dense |" in report and f"`{row['path']}`" in report
    for plot in ("accuracy_vs_compression.png", "accuracy_vs_latency.png", "paths.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["checkpoints"]["target-40"]["0"]["params"] == row["params"]
    assert "`model.generate` is timed too" in report  # and a run with --bench-no-generate says it was not:
    untimed = {**tiny_config([0]).identity(), "latency": asdict(LatencySettings(time_generate=False))}
    assert "`model.generate` is not timed" in markdown(results, "tiny", untimed)

    stage_calls.clear()  # a rerun redoes nothing ...
    same = lambda record: json.loads(json.dumps(record))
    assert same(run_pipeline(str(tiny_dirs["llama-gqa"]), tiny_config([0]), out)) == same(results)
    assert stage_calls == []
    run_pipeline(str(tiny_dirs["llama-gqa"]), tiny_config([0, 1]), out)  # ... and a new seed adds only its stages
    assert sorted(stage_calls) == ["target-20.json", "target-20.json", "target-40.json", "target-40.json"]
    report = (out / "report.md").read_text()
    assert "## Worst seed" in report and "±" in report


def test_run_refuses_another_runs_directory(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    config = tiny_config([0], recovery=None, latency=None, tasks=["wikitext"])
    run_pipeline(str(tiny_dirs["mistral"]), config, out)
    with pytest.raises(MopError, match="other settings.*eval_limit"):
        run_pipeline(str(tiny_dirs["mistral"]), tiny_config([0], recovery=None, latency=None, tasks=["wikitext"],
                                                             eval_limit=5), out)
    with pytest.raises(MopError, match="other settings.*model"):  # another model's dense evaluation is not reused
        run_pipeline(str(tiny_dirs["qwen2"]), config, out)


def test_run_cli_fails_fast_on_a_task_without_data(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "run"
    code = main(["run", str(tiny_dirs["qwen2"]), "--target", "0.2", "--out", str(out), "--tasks", "arc_challenge"])
    assert code == 2 and "arc_challenge" in capsys.readouterr().err
    assert not out.exists()


def fake_vllm_record(candidate, baseline, settings) -> dict:
    """What `benchmark_vllm` returns, with numbers the report must show (the real one is tested in test_vllm)."""
    timing = lambda seconds: {"mean": seconds, "std": 0.01}
    return {"vllm_version": "0.32.0", "settings": {"batch": settings.batch},
            "models": {"candidate": {"end_to_end_s": timing(1.234), "decode_ms_per_token": timing(9.87),
                                     "throughput_tokens_per_s": timing(321.5)}},
            "speedup": timing(1.41), "throughput_speedup": timing(1.52)}


def test_run_with_vllm_timing_reports_it_and_reruns_nothing(tiny_dirs, tmp_path, stage_calls, monkeypatch):
    from mop.latency.vllm_bench import VllmBenchSettings

    monkeypatch.setattr(mop.pipeline, "find_vllm_python", lambda: (tmp_path, ""))
    monkeypatch.setattr(mop.pipeline, "benchmark_vllm", fake_vllm_record)
    out = tmp_path / "run"
    config = tiny_config([0], recovery=None, latency=None, tasks=["wikitext"],
                         vllm_latency=VllmBenchSettings(LatencySettings(runs=3, warmup=1), batch=5))
    run_pipeline(str(tiny_dirs["llama-gqa"]), config, out)
    assert sorted(stage_calls) == ["eval.json", "target-20.json", "target-20.vllm.json", "target-40.json",
                                   "target-40.vllm.json"]
    report = (out / "report.md").read_text()
    assert "## Latency in vLLM" in report and "5 concurrent requests" in report
    assert "| target-40 | seed 0 | 1.234 | 9.87 | 1.41 ± 0.01× | 321.5 | 1.52× |" in report
    stage_calls.clear()
    run_pipeline(str(tiny_dirs["llama-gqa"]), config, out)
    assert stage_calls == []


def test_vllm_timing_without_vllm_is_refused_before_work(tiny_dirs, tmp_path, monkeypatch):
    from mop.latency.vllm_bench import VllmBenchSettings

    monkeypatch.setenv("MOP_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    out = tmp_path / "run"
    with pytest.raises(MopError, match="vLLM not found"):
        run_pipeline(str(tiny_dirs["llama-gqa"]), tiny_config([0], vllm_latency=VllmBenchSettings()), out)
    assert not out.exists()


def test_run_refuses_an_unreachable_target_before_writing_anything(tiny_dirs, tmp_path, capsys, monkeypatch):
    """Depth mode reaches at most 0.5662 of the tiny LLaMA (see test_resume_and_errors); nothing is written,
    a rerun of a finished run loads no model to check its targets again, and a finished run given an
    unreachable target more keeps its settings file as it was."""
    out, model = tmp_path / "run", str(tiny_dirs["llama-gqa"])
    tasks = ["--tasks", "wikitext", "--eval-limit", "2", "--eval-ppl-segment-length", "64", "--no-recovery",
             "--no-bench", "--calib-samples", "4", "--calib-max-length", "32", "--mode", "depth"]
    assert main(["run", model, "--target", "0.7", "--out", str(out), *tasks]) == 2
    assert "target 0.7 cannot be reached in mode depth" in capsys.readouterr().err and not out.exists()

    assert main(["run", model, "--target", "0.2", "--out", str(out), *tasks]) == 0
    settings = (out / "pipeline.json").read_text()
    with monkeypatch.context() as patched:
        patched.setattr(mop.pipeline, "load_model", lambda *args: pytest.fail("a model loaded"))
        assert main(["run", model, "--target", "0.2", "--out", str(out), *tasks]) == 0
    assert main(["run", model, "--target", "0.2", "--target", "0.7", "--out", str(out), *tasks]) == 2
    assert (out / "pipeline.json").read_text() == settings and json.loads(settings)["targets"] == [0.2]


def test_run_ends_with_the_results_table_and_labelled_bars(tiny_dirs, tmp_path, capsys):
    """The terminal: our labelled bars per evaluated task and per latency run, lm-eval's bars in the log only,
    and the report's results (target, compression, path, perplexity, average, speedup) as the last table."""
    out = tmp_path / "run"
    assert main(["run", str(tiny_dirs["llama-gqa"]), "--target", "0.2", "--calib-samples", "4", "--calib-max-length",
                 "32", "--no-recovery", "--tasks", "winogrande,wikitext", "--eval-limit", "2",
                 "--eval-ppl-segment-length", "64", "--bench-runs", "3", "--bench-warmup", "1", "--bench-no-generate",
                 "--out", str(out)]) == 0
    terminal = capsys.readouterr()
    for bar in ("evaluate winogrande: 100%", "evaluate wikitext: 100%", "latency: baseline and candidate: 100%"):
        assert bar in terminal.err
    assert "Running loglikelihood requests" not in terminal.err and "Tokenizing inputs" not in terminal.err
    bars = [state.strip() for state in re.split(r"[\r\n]", terminal.err) if "%|" in state]
    assert bars and all(re.match(r"[A-Za-z]", state) for state in bars)  # every bar on the terminal has a label ...
    assert "INFO lm_eval.api.task: 100%|" in (out / "mop.log").read_text()  # ... lm-eval's unlabelled one is logged

    results = json.loads((out / "results.json").read_text())
    dense, row = results["dense"], results["checkpoints"]["target-20"]["0"]
    lines = [" ".join(re.sub("[│┃]", " ", line).split()) for line in terminal.out.splitlines()]
    assert " ".join(terminal.out.split()).endswith(f"report: {out / 'report.md'}")  # the last line, maybe wrapped
    header = next(i for i, line in enumerate(lines) if line.startswith("target compression %"))
    assert lines[header] == "target compression % path WikiText-2 ppl average % speedup"
    end = next(i for i in range(header, len(lines)) if lines[i].startswith("└"))
    table = [line for line in lines[header + 1:end] if re.search(r"\w", line)]  # not the rules
    assert table == [f"dense 0.0 – {dense['perplexity']:.2f} {100 * dense['average']:.1f} 1.00×",
                     f"target-20 {100 * row['compression']:.1f} {row['path']} {row['perplexity']:.2f} "
                     f"{100 * row['average']:.1f} {row['speedup']:.2f}×"]


def test_compare_results_table_has_a_row_per_method_and_target():
    from mop.report import results_table
    from rich.console import Console

    row = lambda compression, path, ppl, speedup: {"compression": compression, "path": path, "perplexity": ppl,
                                                   "average": 0.5, "speedup": speedup}
    results = {"dense": row(0.0, "", 20.0, 1.0), "methods": {
        "depth": {"checkpoints": {"target-20": {0: row(0.2, "DD", 40.0, 1.3), 1: row(0.2, "DD", 44.0, 1.1)}}},
        "width": {"checkpoints": {"target-20": {0: row(0.2, "WW", 30.0, 1.05)}}}}}
    console = Console(width=200, record=True)
    console.print(results_table(results, "mop compare"))
    lines = [" ".join(re.sub("[│┃]", " ", line).split()) for line in console.export_text().splitlines()]
    assert "target-20 depth 20.0 ± 0.0 DD DD 42.00 ± 2.83 50.0 ± 0.0 1.20 ± 0.14×" in lines
    assert "target-20 width 20.0 WW 30.00 50.0 1.05×" in lines and "dense 0.0 – 20.00 50.0 1.00×" in lines
