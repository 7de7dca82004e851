"""`mop compare` on a tiny model: every method reaches a matched size, the report holds every method's numbers,
a rerun recomputes nothing, and adding a method or a seed computes only it."""

import json

import pytest

import mop.pipeline
from mop.cli import main
from mop.compare import PRESETS, method_config, parse_method, run_compare
from mop.errors import MopError
from mop.models import load_model
from mop.pipeline import PipelineConfig
from mop.pruning.search import SearchConfig
from mop.training import FinetuneConfig, LoraSettings


def tiny_config(**changes) -> PipelineConfig:
    settings = dict(
        search=SearchConfig(targets=[0.2, 0.4], calib_samples=8, calib_max_length=64),
        recovery=FinetuneConfig(max_steps=1, lora=LoraSettings(batch_size=2, micro_batch_size=2, max_length=128)),
        tasks=["arc_easy", "wikitext"], eval_limit=2, eval_batch_size=4, ppl_segment_length=128, latency=None)
    return PipelineConfig(**{**settings, **changes})


@pytest.fixture
def computed(monkeypatch) -> list[str]:
    """The stage outputs that were computed (not found on disk), as paths relative to nothing in particular."""
    calls, stage = [], mop.pipeline.stage

    def counting(output, compute, what):
        return stage(output, lambda: (calls.append(f"{output.parent.parent.name}/{output.name}"), compute())[1], what)

    monkeypatch.setattr(mop.pipeline, "stage", counting)
    return calls


def test_parse_method():
    assert parse_method("depth") == ("depth", {"mode": "depth"})
    assert parse_method("fast-kl:path_criterion=kl,tune_steps_per_iteration=1,calib_samples=4") == (
        "fast-kl", {"path_criterion": "kl", "tune_steps_per_iteration": 1, "calib_samples": 4})
    assert parse_method("depth-kd:mode=depth,recovery.method=kd,recovery.learning_rate=0.002") == (
        "depth-kd", {"mode": "depth", "recovery": {"method": "kd", "learning_rate": 0.002}})
    assert parse_method("kl-short:path_criterion=kl,lora.max_length=256,lora.batch_size=8") == (
        "kl-short", {"path_criterion": "kl", "lora": {"max_length": 256, "batch_size": 8}})
    for bad in ("nonsense", "x:seed=1", "x:mode", ":mode=depth", "dense", "x:recovery.seed=1", "x:recovery.lora=1",
                "x:recovery.nonsense=1", "x:lora.nonsense=1", "x:lora=1", "x:search.mode=depth"):
        with pytest.raises(MopError):
            parse_method(bad)


def test_a_method_sets_its_short_tuning_apart_from_the_recovery():
    base = tiny_config()
    config = method_config(base, parse_method("kl-short:path_criterion=kl,lora.max_length=64,lora.batch_size=2")[1])
    assert (config.search.lora.max_length, config.search.lora.batch_size) == (64, 2)
    assert config.search.lora.micro_batch_size == base.search.lora.micro_batch_size == 4
    assert config.recovery == base.recovery and base.search.lora.max_length == 512
    with pytest.raises(MopError, match="LoRA batch size must be positive"):
        method_config(base, parse_method("x:lora.batch_size=0")[1])


def test_every_preset_is_a_registered_method_with_valid_settings():
    for label in PRESETS:
        assert method_config(tiny_config(), parse_method(label)[1]).search.method in ("mop", "shortgpt", "llm-pruner")
    with pytest.raises(MopError, match="unknown pruning method"):
        method_config(tiny_config(), parse_method("x:method=llm_pruner")[1])


def test_compare_matched_sizes_report_and_incremental_reruns(tiny_dirs, tmp_path, computed, monkeypatch):
    model, out = str(tiny_dirs["llama-gqa"]), tmp_path / "compare"
    methods = dict(map(parse_method, ["mop", "depth", "width"]))
    results = run_compare(model, tiny_config(), methods, out)
    assert sorted(computed) == sorted(["compare/eval.json"] + [f"seed-0/target-{t}.json" for t in (20, 40)] * 3)
    loaded = load_model(model)
    original = sum(p.numel() for p in loaded.model.parameters())
    layer_share = sum(p.numel() for p in loaded.model.model.layers[0].parameters()) / original
    for label in methods:
        for target in (0.2, 0.4):
            name = f"target-{round(100 * target)}"
            provenance = json.loads((out / label / "seed-0" / "recovered" / name / "mop.json").read_text())
            assert target <= provenance["compression"] < target + layer_share  # matched within one layer's share
            row = results["methods"][label]["checkpoints"][name][0]
            evaluation = json.loads((out / label / "seed-0" / "eval" / f"{name}.json").read_text())
            assert row["perplexity"] == evaluation["tasks"]["wikitext"]["perplexity"]
            assert row["params"] == evaluation["model"]["params"] == provenance["params"]
    assert set(json.loads((out / "depth" / "seed-0" / "recovered" / "target-40" / "mop.json").read_text())["path"]) == {"D"}
    assert set(json.loads((out / "width" / "seed-0" / "recovered" / "target-40" / "mop.json").read_text())["path"]) == {"W"}
    report = (out / "report.md").read_text()
    assert "## 40% target" in report and "| depth | 1 |" in report and "Δ average" in report

    computed.clear()  # a rerun computes nothing ...
    assert json.dumps(run_compare(model, tiny_config(), methods, out)) == json.dumps(results)
    assert computed == []
    # ... a new method computes only its own stages, a new seed only that seed's
    run_compare(model, tiny_config(), dict([parse_method("depth-bi")]), out)
    assert sorted(computed) == ["seed-0/target-20.json", "seed-0/target-40.json"]
    assert (out / "depth-bi" / "seed-0" / "eval" / "target-40.json").is_file()
    computed.clear()
    run_compare(model, tiny_config(seeds=[1]), dict([parse_method("mop")]), out)
    assert sorted(computed) == ["seed-1/target-20.json", "seed-1/target-40.json"]
    seeds = json.loads((out / "results.json").read_text())["methods"]["mop"]["checkpoints"]["target-20"]
    assert sorted(seeds) == ["0", "1"]
    worst_seed = min(seeds.values(), key=lambda r: r["average"])  # its average and its perplexity
    worst = f"{100 * worst_seed['average']:.1f} / {worst_seed['perplexity']:.2f}"
    assert f"| {worst} |" in (out / "report.md").read_text().split("## 40% target")[0]  # the 20% table
    # a rerun for fewer targets (the study's latency pass of a 20% cell) computes nothing, reports every target found
    computed.clear()
    run_compare(model, tiny_config(search=SearchConfig(targets=[0.2], calib_samples=8, calib_max_length=64)),
                dict([parse_method("width")]), out)
    report = (out / "report.md").read_text()
    assert computed == [] and "## 20% target" in report and "## 40% target" in report
    assert json.loads((out / "compare.json").read_text())["targets"] == [0.2, 0.4]


def test_compare_refuses_other_shared_settings(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "compare"
    config = tiny_config(recovery=None, tasks=["wikitext"], search=SearchConfig(targets=[0.2], calib_samples=4,
                                                                                  calib_max_length=32))
    run_compare(str(tiny_dirs["mistral"]), config, dict([parse_method("depth")]), out)
    with pytest.raises(MopError, match="other settings.*eval_limit"):
        run_compare(str(tiny_dirs["mistral"]), tiny_config(recovery=None, tasks=["wikitext"], eval_limit=5),
                    dict([parse_method("depth")]), out)
    code = main(["compare", str(tiny_dirs["mistral"]), "--methods", "nonsense", "--target", "0.2", "--out", str(out)])
    assert code == 2 and "unknown method nonsense" in capsys.readouterr().err


def test_compare_refuses_an_unreachable_target_of_any_method_before_writing_anything(tiny_dirs, tmp_path):
    """The mixture reaches 0.7 on the tiny LLaMA, depth-only at most 0.5662 (see test_resume_and_errors): the
    first method's run, the shared settings and the dense evaluation are not started."""
    out = tmp_path / "compare"
    config = tiny_config(recovery=None, tasks=["wikitext"], search=SearchConfig(targets=[0.7], calib_samples=4,
                                                                                  calib_max_length=32))
    with pytest.raises(MopError, match="target 0.7 cannot be reached in mode depth"):
        run_compare(str(tiny_dirs["llama-gqa"]), config, dict(map(parse_method, ["mop", "depth"])), out)
    assert not out.exists()


def test_a_method_recovered_otherwise_shares_the_search_and_says_so_in_the_report(tiny_dirs, tmp_path):
    """`depth-kd` prunes exactly as `depth` (the same checkpoint) and is recovered by distillation at its own
    learning rate; the other method keeps the shared recovery, and the report's method table says which is which."""
    model, out = str(tiny_dirs["llama-gqa"]), tmp_path / "compare"
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"Line {i} of a small corpus about pruning and recovery." for i in range(64)))
    config = tiny_config(tasks=["wikitext"], search=SearchConfig(targets=[0.2], calib_samples=4, calib_max_length=32))
    methods = dict(map(parse_method, ["depth", f"depth-kd:mode=depth,recovery.method=kd,recovery.kd_data={texts},"
                                               "recovery.learning_rate=0.002"]))
    run_compare(model, config, methods, out)
    provenance = {label: json.loads((out / label / "seed-0" / "recovered" / "target-20" / "mop.json").read_text())
                  for label in methods}
    assert provenance["depth"]["path"] == provenance["depth-kd"]["path"] == "DD"
    assert provenance["depth"]["finetune"]["method"] == "sft"
    assert provenance["depth"]["finetune"]["settings"]["lora"]["learning_rate"] == 3e-4
    assert provenance["depth-kd"]["finetune"]["method"] == "kd"
    assert provenance["depth-kd"]["finetune"]["settings"]["lora"]["learning_rate"] == 0.002
    steps = [[{k: v for k, v in step.items() if k != "seconds"}
              for step in json.loads((out / label / "seed-0" / "prune" / "run.json").read_text())["iterations"]]
             for label in methods]
    assert steps[0] == steps[1] and len(steps[0]) == 2
    assert json.loads((out / "compare.json").read_text())["identity"]["recovery"]["method"] == "sft"
    report = (out / "report.md").read_text()
    assert "| depth | mode=depth, calib_samples=4, calib_max_length=32 | the shared |" in report
    assert (f"| depth-kd | mode=depth, calib_samples=4, calib_max_length=32 | lora.learning_rate=0.002, method=kd, "
            f"kd_data={texts} |") in report


def test_recovery_fields_without_recovery_are_refused(tiny_dirs, tmp_path):
    with pytest.raises(MopError, match="no recovery"):
        run_compare(str(tiny_dirs["mistral"]), tiny_config(recovery=None),
                    dict([parse_method("kd:recovery.method=kd")]), tmp_path / "compare")
