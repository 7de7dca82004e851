"""The report of `mop run`: OUT/report.md (tables), OUT/results.json (the numbers behind them) and three plots —
accuracy vs compression, accuracy vs latency, and the depth/width path of every seed."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from mop.evaluation import PAPER_METRIC, PERPLEXITY_TASK  # noqa: E402
from mop.modelcard import predicted_in  # noqa: E402
from mop.pruning.search import SearchConfig  # noqa: E402
from mop.pruning.targets import every_target  # noqa: E402
from mop.provenance import write_json_atomic  # noqa: E402

PATH_COLOURS = {"D": "#c0504d", "W": "#4f81bd"}
# The methods of a plot, by family: MoP variants in blues and purples with solid lines, the extremes (depth-only
# in greens, width-only in oranges) dashed, the peer methods in reds and browns dotted; every method its own
# colour (the next of its family's) and marker (the next of MARKERS).
FAMILIES = {"MoP": ("-", ["#08519c", "#7a0177", "#41b6c4", "#807dba", "#6baed6", "#3f007d", "#1d91c0", "#c51b8a"]),
            "depth-only": ("--", ["#1b7837", "#5aae61", "#00441b", "#a6dba0"]),
            "width-only": ("--", ["#d95f02", "#fdae61", "#8c2d04", "#f16913"]),
            "peers": (":", ["#b2182b", "#8c510a", "#e7298a", "#bf812d"])}
FAMILY_HEADINGS = {"MoP": "MoP variants", "depth-only": "depth-only (extreme)", "width-only": "width-only (extreme)",
                   "peers": "peer methods"}
MARKERS = "osD^vP<X>hp*d"


def method_name(search: dict) -> str:
    """What a run's search settings ran, in words: MoP, depth-only, width-only, or the peer method's name."""
    if search.get("method", "mop") != "mop":
        return search["method"]
    return {"depth": "depth-only", "width": "width-only"}.get(search.get("mode", "mop"), "MoP")


def _family(search: dict) -> str:
    name = method_name(search)
    return name if name in ("MoP", "depth-only", "width-only") else "peers"


def method_styles(methods: dict) -> dict[str, dict]:
    """Per method label (settings as `collect_comparison` reads them), its family and plot style."""
    used = {family: 0 for family in FAMILIES}
    styles = {}
    for index, (label, method) in enumerate(methods.items()):
        family = _family(method["settings"]["search"])
        line, colours = FAMILIES[family]
        styles[label] = {"family": family, "color": colours[used[family] % len(colours)], "linestyle": line,
                         "marker": MARKERS[index % len(MARKERS)]}
        used[family] += 1
    return styles


def plain_log_ticks(axis) -> None:
    """A log axis labelled in plain numbers (60, 100, 1,000), at 1, 2 and 5 of each decade (every digit when
    the range spans less than one decade), with no minor labels."""
    low, high = axis.get_view_interval()
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if high / low > 10 else range(1, 10)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def task_scores(evaluation: dict) -> dict[str, float]:
    """Per accuracy task, the paper's metric (acc for WinoGrande, acc_norm for the others), in [0, 1]."""
    return {task: metrics[PAPER_METRIC.get(task, "acc_norm")]
            for task, metrics in evaluation["tasks"].items() if task != PERPLEXITY_TASK}


def task_stderrs(evaluation: dict) -> dict[str, float | None]:
    """Per accuracy task, the standard error of the paper's metric."""
    return {task: metrics.get(PAPER_METRIC.get(task, "acc_norm") + "_stderr")
            for task, metrics in evaluation["tasks"].items() if task != PERPLEXITY_TASK}


def result_row(evaluation: dict, provenance: dict | None, latency: dict | None, vllm: dict | None = None) -> dict:
    """One checkpoint's numbers: compression, parameters, path, perplexity, task scores, average, latency (in
    transformers, and in vLLM when timed there)."""
    perplexity = evaluation["tasks"].get(PERPLEXITY_TASK, {}).get("perplexity")
    row = {"params": evaluation["model"]["params"], "perplexity": perplexity, "tasks": task_scores(evaluation),
           # a VLM's whole model beside its language model (`params`, what the compression counts)
           "whole_model_params": evaluation["model"].get("whole_model_params", evaluation["model"]["params"]),
           "stderr": task_stderrs(evaluation), "average": evaluation["average"]}
    if provenance is not None:
        row.update(compression=provenance["compression"], path=provenance["path"],
                   non_embedding_compression=provenance["non_embedding_compression"],
                   recovery_steps=(provenance.get("finetune") or {}).get("steps"))
        if "predicted_speedup" in provenance:  # a run with speed targets: its latency model's prediction
            row.update(predicted_speedup=provenance["predicted_speedup"], predicted_in=predicted_in(provenance))
    if latency is not None:
        row.update(latency_s=latency["models"]["candidate"]["end_to_end_s"]["mean"],
                   decode_ms_per_token=latency["models"]["candidate"]["decode_ms_per_token"]["mean"],
                   baseline_latency_s=latency["models"]["baseline"]["end_to_end_s"]["mean"],
                   speedup=latency["speedup"]["mean"], speedup_std=latency["speedup"]["std"],
                   device=latency["device"], dtype=latency["dtype"])
    if vllm is not None:
        candidate = vllm["models"]["candidate"]
        row.update(vllm_latency_s=candidate["end_to_end_s"]["mean"],
                   vllm_decode_ms_per_token=candidate["decode_ms_per_token"]["mean"],
                   vllm_throughput=candidate["throughput_tokens_per_s"]["mean"],
                   vllm_speedup=vllm["speedup"]["mean"], vllm_speedup_std=vllm["speedup"]["std"],
                   vllm_throughput_speedup=vllm["throughput_speedup"]["mean"], vllm_version=vllm["vllm_version"],
                   vllm_batch=vllm["settings"]["batch"])
    return row


def collect(out: Path, names: list[str], seeds: list[int], recovered: bool, dense: Path | None = None) -> dict:
    """Every finished checkpoint's row, per target name (`Target.name`) and seed, and the dense model's."""
    rows: dict[str, dict[int, dict]] = {}
    for name in names:
        for seed in seeds:
            seed_dir = out / f"seed-{seed}"
            checkpoint = seed_dir / ("recovered" if recovered else "prune") / name
            evaluation = _read(seed_dir / "eval" / f"{name}.json")
            if evaluation is not None:
                rows.setdefault(name, {})[seed] = result_row(
                    evaluation, _read(checkpoint / "mop.json"), _read(seed_dir / "bench" / f"{name}.json"),
                    _read(seed_dir / "bench" / f"{name}.vllm.json"))
    dense = result_row(_read(dense or out / "dense" / "eval.json"), None, None)
    dense.update(compression=0.0, path="", speedup=1.0, speedup_std=0.0)
    baselines = [r["baseline_latency_s"] for per_seed in rows.values() for r in per_seed.values() if "latency_s" in r]
    if baselines:
        dense["latency_s"] = statistics.mean(baselines)
    return {"dense": dense, "checkpoints": rows}


# ---------------------------------------------------------------- tables


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(l) + " |" for l in lines]


def _params_cell(rows: list[dict]) -> str:
    """Mean parameter count in millions; a VLM's language model first, then the whole model."""
    language, whole = (statistics.mean(r[key] for r in rows) / 1e6 for key in ("params", "whole_model_params"))
    return f"{language:.2f} M" if language == whole else f"{language:.2f} M (whole model {whole:.2f} M)"


def _speedup_cell(rows: list[dict]) -> str:
    """The measured speedup (mean ± std over seeds), and beside it the predicted one of a speed target's run; a
    speed predicted for vLLM is set beside the speedup measured in vLLM."""
    predicted = [r["predicted_speedup"] for r in rows if "predicted_speedup" in r]
    in_vllm = any(r.get("predicted_in") == "vllm" for r in rows)
    key = "vllm_speedup" if in_vllm else "speedup"
    measured = _mean_std([r.get(key) for r in rows], digits=2) + "×" if any(r.get(key) for r in rows) else "–"
    return measured + (f" (predicted {_mean_std(predicted, digits=2)}×{' in vLLM' if in_vllm else ''})"
                       if predicted else "")


def _cells(rows: list[dict], tasks: list[str]) -> list[str]:
    """Table cells of one or more rows of the same checkpoint (mean ± std when several seeds)."""
    get = lambda key: [r.get(key) for r in rows]
    return [
        _mean_std(get("compression"), 100), _params_cell(rows),
        " ".join(f"`{r['path']}`" for r in rows if r.get("path")) or "–",
        _mean_std(get("perplexity"), digits=2),
        *[_mean_std([r["tasks"].get(t) for r in rows], 100) for t in tasks],
        _mean_std(get("average"), 100), _speedup_cell(rows),
    ]


def results_table(results: dict, title: str) -> Table:
    """The report's results for the terminal: per checkpoint (per method too, for `mop compare`'s results)
    target, compression (% of all parameters), path, WikiText-2 perplexity, average accuracy (%) and speedup,
    mean ± std over seeds; the dense model first."""
    methods = results.get("methods")
    table = Table(title=title)
    for column in ("target", *(["method"] if methods else []), "compression %", "path", "WikiText-2 ppl",
                   "average %", "speedup"):
        table.add_column(column, justify="left" if column in ("target", "method", "path") else "right")
    table.add_row("dense", *([""] if methods else []), *_summary_cells([results["dense"]]))
    per_method = methods.items() if methods else [(None, results)]
    targets = sorted({name for _, method in per_method for name in method["checkpoints"]})
    for name in targets:
        for label, method in per_method:
            if rows := list(method["checkpoints"].get(name, {}).values()):
                table.add_row(name, *([label] if methods else []), *_summary_cells(rows))
    return table


def _summary_cells(rows: list[dict]) -> list[str]:
    """The terminal table's cells of one checkpoint's rows (one per seed)."""
    get = lambda key: [r.get(key) for r in rows]
    return [_mean_std(get("compression"), 100), " ".join(r["path"] for r in rows if r.get("path")) or "–",
            _mean_std(get("perplexity"), digits=2), _mean_std(get("average"), 100), _speedup_cell(rows)]


def markdown(results: dict, model: str, settings: dict) -> str:
    dense, checkpoints = results["dense"], results["checkpoints"]
    tasks = list(dense["tasks"])
    seeds = sorted({seed for per_seed in checkpoints.values() for seed in per_seed})
    header = ["target", "compression %", "parameters", "path", "WikiText-2 ppl",
              *[f"{t} ({PAPER_METRIC.get(t, 'acc_norm')})" for t in tasks], "average", "speedup"]
    summary = [["dense", *_cells([dense], tasks)]]
    summary += [[name, *_cells(list(per_seed.values()), tasks)] for name, per_seed in checkpoints.items()]
    several = len(seeds) > 1
    lines = [f"# MoP report: {model}", "",
             f"Seeds {', '.join(map(str, seeds))}; accuracies in %, "
             + ("mean ± std over seeds; " if several else "")
             + "the average is the paper's (acc for WinoGrande, acc_norm for the others).", ""]
    if settings.get("eval_limit"):
        lines += [f"**Evaluated on at most {settings['eval_limit']} documents per task** (`--eval-limit`): a quick "
                  "look, not comparable with full-set numbers.", ""]
    lines += ["## Results", "", *_table(header, summary), ""]
    if several:
        worst = [[name, f"seed {seed}", *_cells([row], tasks)] for name, per_seed in checkpoints.items()
                 for seed, row in [min(per_seed.items(), key=lambda item: item[1]["average"] or 0)]]
        lines += ["## Worst seed (lowest average)", "", *_table(["target", "seed", *header[1:]], worst), ""]
        every = [[name, f"seed {seed}", *_cells([row], tasks)] for name, per_seed in checkpoints.items()
                 for seed, row in sorted(per_seed.items())]
        lines += ["## Every seed", "", *_table(["target", "seed", *header[1:]], every), ""]
    lines += ["## Plots", "", "![accuracy vs compression](accuracy_vs_compression.png)", "",
              "![accuracy vs latency](accuracy_vs_latency.png)", "", "![paths](paths.png)", ""]
    timed = [r for per_seed in checkpoints.values() for r in per_seed.values() if "latency_s" in r]
    if timed:
        generate = ("`model.generate` is timed too, and its speedup is in `seed-S/bench/target-XX.json` "
                    "(`generate_speedup`)." if settings["latency"]["time_generate"]
                    else "`model.generate` is not timed (`--bench-no-generate`).")
        lines += ["## Latency", "",
                  f"Batch 1, a {settings['latency']['prompt_tokens']}-token prompt, {settings['latency']['new_tokens']} "
                  f"generated tokens, {settings['latency']['runs']} runs of which the first "
                  f"{settings['latency']['warmup']} are discarded; dense and pruned timed alternately in one process; "
                  f"{timed[0]['device']}, {timed[0]['dtype']}. Dense: {dense.get('latency_s', float('nan')):.3f} s. "
                  "Times are those of mop's own greedy loop (exactly that many tokens, EOS not stopping it, no "
                  "logits processors; the same tokens as greedy `generate`), which isolates the forward passes "
                  f"pruning speeds up; {generate}", "",
                  *_table(["target", "seed", "end-to-end s", "decode ms/token", "speedup"],
                          [[name, f"seed {seed}", f"{r['latency_s']:.3f}", f"{r['decode_ms_per_token']:.2f}",
                            f"{r['speedup']:.2f} ± {r['speedup_std']:.2f}×"]
                           for name, per_seed in checkpoints.items() for seed, r in sorted(per_seed.items())
                           if "latency_s" in r]), ""]
    served = [r for per_seed in checkpoints.values() for r in per_seed.values() if "vllm_speedup" in r]
    if served:
        lines += ["## Latency in vLLM", "",
                  f"vLLM {served[0]['vllm_version']} (`--bench-vllm`): the same prompt, tokens, runs and alternation, "
                  f"both models served side by side; throughput with {served[0]['vllm_batch']} concurrent requests. "
                  "Protocol and raw runs in `seed-S/bench/target-XX.vllm.json`.", "",
                  *_table(["target", "seed", "end-to-end s", "decode ms/token", "speedup", "tokens/s (batch)",
                           "throughput speedup"],
                          [[name, f"seed {seed}", f"{r['vllm_latency_s']:.3f}", f"{r['vllm_decode_ms_per_token']:.2f}",
                            f"{r['vllm_speedup']:.2f} ± {r['vllm_speedup_std']:.2f}×", f"{r['vllm_throughput']:.1f}",
                            f"{r['vllm_throughput_speedup']:.2f}×"]
                           for name, per_seed in checkpoints.items() for seed, r in sorted(per_seed.items())
                           if "vllm_speedup" in r]), ""]
    lines += ["## Settings", "", "```json", json.dumps(settings, indent=1), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _quality(row: dict) -> tuple[float | None, str]:
    """The y value of the plots: the average accuracy (%) when accuracy tasks ran, else the perplexity."""
    if row["average"] is not None:
        return 100 * row["average"], "average accuracy (%)"
    return row["perplexity"], "WikiText-2 perplexity"


def plot_accuracy(results: dict, x_key: str, x_label: str, x_scale: float, out: Path, method: str = "MoP") -> None:
    """One line per seed of `method` (what was run, e.g. "width-only"), and the dense model."""
    dense, checkpoints = results["dense"], results["checkpoints"]
    figure, axes = plt.subplots(figsize=(6, 4))
    label = _quality(dense)[1]
    if dense.get(x_key) is not None:
        axes.scatter([dense[x_key] * x_scale], [_quality(dense)[0]], marker="*", s=160, color="black", label="dense")
    seeds = sorted({seed for per_seed in checkpoints.values() for seed in per_seed})
    for index, seed in enumerate(seeds):
        points = sorted((r[x_key] * x_scale, _quality(r)[0]) for per_seed in checkpoints.values()
                        for s, r in per_seed.items() if s == seed and r.get(x_key) is not None)
        if points:
            axes.plot(*zip(*points), marker=MARKERS[index % len(MARKERS)], alpha=0.8, label=f"{method} seed {seed}")
    axes.set_xlabel(x_label)
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # nothing plotted yet (e.g. no latency measured): no legend
        axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def plot_paths(results: dict, out: Path) -> None:
    """One strip per seed: a cell per iteration, red for a depth step, blue for a width step; each target's
    checkpoint is marked where the path reached it."""
    checkpoints = results["checkpoints"]
    seeds = sorted({seed for per_seed in checkpoints.values() for seed in per_seed})
    paths = {seed: max((per_seed[seed].get("path", "") for per_seed in checkpoints.values() if seed in per_seed), key=len)
             for seed in seeds}
    longest = max((len(p) for p in paths.values()), default=1)
    pitch = 1.5  # vertical distance between strips, room for the checkpoint labels
    figure, axes = plt.subplots(figsize=(max(5, 0.45 * longest + 2), pitch * 0.5 * len(seeds) + 1.2))
    for row, seed in enumerate(seeds):
        bottom = row * pitch
        for i, step in enumerate(paths[seed]):
            axes.add_patch(plt.Rectangle((i + 0.55, bottom), 0.9, 1, color=PATH_COLOURS[step]))
            axes.text(i + 1, bottom + 0.5, step, ha="center", va="center", color="white", fontsize=8)
        for name, per_seed in checkpoints.items():
            if seed in per_seed and per_seed[seed].get("path"):
                end = len(per_seed[seed]["path"]) + 0.5
                axes.plot([end, end], [bottom - 0.1, bottom + 1.1], color="black", linewidth=1.5)
                axes.text(end, bottom + 1.12, name.removeprefix("target-") + "%", ha="center", va="bottom", fontsize=7)
    axes.set_xlim(0.4, longest + 0.9)
    axes.set_ylim(-0.2, pitch * (len(seeds) - 1) + 1.5)
    axes.set_xticks(range(1, longest + 1))
    axes.set_yticks([r * pitch + 0.5 for r in range(len(seeds))], [f"seed {s}" for s in seeds])
    axes.set_xlabel("iteration (D depth, W width; | checkpoint)")
    for side in ("top", "right", "left"):
        axes.spines[side].set_visible(False)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def write_plots(results: dict, out: Path, method: str) -> None:
    """The three plots of a run's report, from its results (those of results.json) and what was run."""
    plot_accuracy(results, "compression", "compression (% of parameters removed)", 100,
                  out / "accuracy_vs_compression.png", method)
    plot_accuracy(results, "latency_s", "end-to-end latency (s, 128 tokens)", 1, out / "accuracy_vs_latency.png",
                  method)
    plot_paths(results, out / "paths.png")


def write_report(out: Path, model: str, config, dense: Path | None = None) -> dict:
    """Collect every finished stage of the run in `out`, write report.md, results.json and the plots."""
    settings = json.loads(json.dumps(config.identity()))
    settings["latency"] = None if config.latency is None else asdict(config.latency)
    names = [t.name for t in config.search.every_target]
    results = collect(out, names, config.seeds, config.recovery is not None, dense)
    write_json_atomic(out / "results.json", {"model": model, "seeds": config.seeds, **results})
    write_plots(results, out, method_name(settings["search"]))
    (out / "report.md").write_text(markdown(results, model, settings))
    return results


# ---------------------------------------------------------------- comparison of methods (mop compare)


def _seeds(method_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("seed-")) for p in method_dir.glob("seed-*") if p.is_dir())


def collect_comparison(out: Path) -> dict:
    """Per method label, per target name, per seed: the finished checkpoint's row; and the dense row."""
    claimed = json.loads((out / "compare.json").read_text())
    targets, speedups = claimed["targets"], claimed.get("speedups", [])
    names = [t.name for t in every_target(targets, speedups)]
    methods, dense = {}, None
    for method_dir in sorted(p for p in out.iterdir() if (p / "pipeline.json").is_file()):
        recovered = json.loads((method_dir / "pipeline.json").read_text())["identity"]["recovery"] is not None
        rows = collect(method_dir, names, _seeds(method_dir), recovered, out / "dense" / "eval.json")
        methods[method_dir.name] = {"settings": json.loads((method_dir / "pipeline.json").read_text())["identity"],
                                    "checkpoints": rows["checkpoints"]}
        dense = rows["dense"]
    baselines = [r["baseline_latency_s"] for method in methods.values() for per_seed in method["checkpoints"].values()
                 for r in per_seed.values() if "latency_s" in r]
    if baselines:  # the dense model as timed beside every method's checkpoints, not one method's only
        dense["latency_s"] = statistics.mean(baselines)
    return {"targets": targets, **({"speedups": speedups} if speedups else {}), "dense": dense, "methods": methods}


def _average_stderr(row: dict, evaluation_tasks: list[str]) -> float | None:
    """Standard error of the paper's average: sqrt(Σ se_t²) / n_tasks (tasks independent)."""
    errors = row.get("stderr", {})
    values = [errors.get(t) for t in evaluation_tasks]
    if not values or any(v is None for v in values):
        return None
    return sum(v * v for v in values) ** 0.5 / len(values)


def _mean_stderr(rows: list[dict], evaluation_tasks: list[str]) -> float | None:
    """The mean over seeds of the average's standard error; None when any seed lacks one."""
    errors = [_average_stderr(r, evaluation_tasks) for r in rows]
    return None if any(e is None for e in errors) else statistics.mean(errors)


def comparison_markdown(results: dict, model: str, settings: dict, reference: str = "mop") -> str:
    dense, methods = results["dense"], results["methods"]
    tasks = list(dense["tasks"])
    header = ["method", "seeds", "compression % (all / body)", "parameters", "WikiText-2 ppl",
              *[f"{t}" for t in tasks], "average", "worst seed (average / ppl)", "speedup"]
    lines = [f"# Comparison of pruning methods: {model}", "",
             "Accuracies in %, mean ± std over seeds where a method has several, and its worst seed (the seed of "
             "the lowest average: its average and perplexity); the average is the paper's (acc for WinoGrande, "
             "acc_norm for the others). Compression is of all parameters (the paper's definition) and, after the "
             "slash, of the non-embedding (body) parameters.", ""]
    if settings.get("eval_limit"):
        lines += [f"Tasks on their first {settings['eval_limit']} documents; perplexity on "
                  f"{settings.get('ppl_segments') or settings['eval_limit']} segments of "
                  f"{settings['ppl_segment_length']} tokens.", ""]
    lines += _method_settings(methods, settings)
    present = {name for m in methods.values() for name in m["checkpoints"]}
    for target in every_target(results["targets"], results.get("speedups", [])):
        if target.name not in present:
            continue
        table = [["dense", "", "0 / 0", f"{dense['params'] / 1e6:.2f} M", _mean_std([dense["perplexity"]], digits=2),
                  *[_mean_std([dense["tasks"].get(t)], 100) for t in tasks], _mean_std([dense["average"]], 100), "",
                  "1.00×"]]
        reached = {label: list(method["checkpoints"].get(target.name, {}).values()) for label, method in methods.items()}
        reached = {label: rows for label, rows in reached.items() if rows}
        if target.kind == "speedup":  # equal speed: the best quality first
            reached = dict(sorted(reached.items(), key=lambda item: _quality_rank(item[1])))
        for label, rows in reached.items():
            compression = (_mean_std([r.get("compression") for r in rows], 100) + " / "
                           + _mean_std([r.get("non_embedding_compression") for r in rows], 100))
            table.append([label, str(len(rows)), compression, f"{statistics.mean(r['params'] for r in rows) / 1e6:.2f} M",
                          _mean_std([r["perplexity"] for r in rows], digits=2),
                          *[_mean_std([r["tasks"].get(t) for r in rows], 100) for t in tasks],
                          _mean_std([r["average"] for r in rows], 100), _worst(rows), _speedup_cell(rows)])
        if target.kind == "speedup":
            lines += [f"## {target.value:.2f}× speedup", "",
                      f"Every method stopped at its first step predicted at least {target.value:.2f}× as fast as the "
                      "dense model (its latency model); ranked by average accuracy (by perplexity without accuracy "
                      "tasks), best first; the speedup column is measured, the prediction beside it.", ""]
        else:
            lines += [f"## {target.name.removeprefix('target-')}% target", ""]
        lines += [*_table(header, table), ""]
        lines += _differences(methods, target.name, tasks, reference)
    speed = ["![accuracy vs speedup](accuracy_vs_speedup.png)", "",
             "![perplexity vs speedup](perplexity_vs_speedup.png)", ""] if results.get("speedups") else []
    lines += ["## Plots", "", "![accuracy vs compression](accuracy_vs_compression.png)", "",
              "![perplexity vs compression](perplexity_vs_compression.png)", "",
              "![accuracy vs latency](accuracy_vs_latency.png)", "", *speed,
              "## Settings", "", "```json", json.dumps(settings, indent=1), "```", ""]
    return "\n".join(lines)


def _quality_rank(rows: list[dict]) -> float:
    """A sort key, lower is better: minus the mean average accuracy, or the mean perplexity without accuracy tasks
    (a seed without either last)."""
    if all(r["average"] is not None for r in rows):
        return -statistics.mean(r["average"] for r in rows)
    if all(r["perplexity"] is not None for r in rows):
        return statistics.mean(r["perplexity"] for r in rows)
    return float("inf")


def _worst(rows: list[dict]) -> str:
    """The worst seed's average accuracy (%) and perplexity, both of that one seed (the lowest average; without
    accuracy tasks, the highest perplexity), when there are several seeds."""
    if len(rows) < 2:
        return ""
    if all(r["average"] is not None for r in rows):
        worst = min(rows, key=lambda r: r["average"])
    else:
        worst = max(rows, key=lambda r: r["perplexity"] if r["perplexity"] is not None else -1)
    average = "–" if worst["average"] is None else f"{100 * worst['average']:.1f}"
    return f"{average} / " + ("–" if worst["perplexity"] is None else f"{worst['perplexity']:.2f}")


def _changed(settings: dict, reference: dict, prefix: str = "") -> list[str]:
    """`key=value` for every setting that differs from `reference` (nested dicts as `outer.inner`)."""
    changes = []
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(reference.get(key), dict):
            changes += _changed(value, reference[key], f"{prefix}{key}.")
        elif value != reference.get(key):
            changes.append(f"{prefix}{key}={value}")
    return changes


def _method_settings(methods: dict, settings: dict) -> list[str]:
    """What each method sets: its search settings other than the defaults, its recovery other than the shared."""
    defaults = {k: v for k, v in SearchConfig(targets=[0.5]).identity().items() if k != "seed"}
    rows = [[label, ", ".join(_changed(method["settings"]["search"], defaults)) or "the defaults (the paper's)",
             ", ".join(_changed(method["settings"]["recovery"] or {}, settings["recovery"] or {})) or "the shared"]
            for label, method in methods.items()]
    return ["## Methods", "", *_table(["method", "search (other than the defaults)", "recovery (other than the shared)"],
                                      rows), ""]


def _differences(methods: dict, target: str, tasks: list[str], reference: str) -> list[str]:
    """Each method's average minus the reference method's, against the reference's seed spread and the
    standard error of the two averages (a difference counts when it exceeds both 2·SE and the seed range)."""
    ref_rows = list(methods.get(reference, {}).get("checkpoints", {}).get(target, {}).values())
    if not ref_rows or any(r["average"] is None for r in ref_rows):  # no reference, or no accuracy task
        return []
    accuracy_tasks = [t for t in tasks if t != PERPLEXITY_TASK]
    ref_avg = statistics.mean(r["average"] for r in ref_rows)
    spread = max(r["average"] for r in ref_rows) - min(r["average"] for r in ref_rows)
    ref_se = _mean_stderr(ref_rows, accuracy_tasks)
    table = []
    for label, method in methods.items():
        rows = list(method["checkpoints"].get(target, {}).values())
        if label == reference or not rows or any(r["average"] is None for r in rows):
            continue
        delta = statistics.mean(r["average"] for r in rows) - ref_avg
        method_se = _mean_stderr(rows, accuracy_tasks)
        if ref_se is None or method_se is None:  # an unknown error is not a small one: no verdict
            table.append([label, f"{100 * delta:+.1f}", "–", f"{100 * spread:.1f}", "unknown (no standard error)"])
            continue
        se = (ref_se**2 + method_se**2) ** 0.5
        exceeds = abs(delta) > 2 * se and abs(delta) > spread
        table.append([label, f"{100 * delta:+.1f}", f"{200 * se:.1f}", f"{100 * spread:.1f}",
                      ("yes: " + ("better" if delta > 0 else "worse")) if exceeds else "no"])
    return [f"Average accuracy against `{reference}` ({len(ref_rows)} seed(s)): a difference counts when it exceeds "
            "both 2 standard errors of the two averages and the reference's seed range (max − min); where a "
            "standard error is missing (lm-eval gives none, e.g. for one document) there is no verdict.", "",
            *_table(["method", "Δ average (points)", "2·SE (points)", f"{reference} seed range (points)", "exceeds both"],
                    table), ""]


def plot_comparison(results: dict, y: str, x: str, x_label: str, x_scale: float, out: Path) -> None:
    """One line per method (mean over seeds per target) of `y` ('average' or 'perplexity') against `x`, each in
    its own colour and marker (`method_styles`); the legend beside the axes, by family."""
    figure, axes = plt.subplots(figsize=(9, 5))
    dense = results["dense"]
    def value(row: dict) -> float | None:
        return row["perplexity"] if y == "perplexity" else None if row["average"] is None else 100 * row["average"]

    entries = {}  # family -> [(handle, label)]
    if dense.get(x) is not None and value(dense) is not None:
        handle = axes.scatter([dense[x] * x_scale], [value(dense)], marker="*", s=200, color="black", zorder=3)
        entries["dense"] = [(handle, "dense")]
    styles = method_styles(results["methods"])
    for label, method in results["methods"].items():
        points = []  # one per checkpoint, in the order of x, so that a line follows the method along the axis
        for per_seed in method["checkpoints"].values():
            rows = [r for r in per_seed.values() if r.get(x) is not None and value(r) is not None]
            if rows:
                points.append((statistics.mean(r[x] for r in rows) * x_scale, statistics.mean(value(r) for r in rows)))
        points.sort()
        if points:
            style = styles[label]
            handle, = axes.plot(*zip(*points), color=style["color"], linestyle=style["linestyle"],
                                marker=style["marker"], markersize=7, linewidth=1.6, alpha=0.9)
            entries.setdefault(style["family"], []).append((handle, label))
    axes.set_xlabel(x_label)
    axes.set_ylabel("average accuracy (%)" if y == "average" else "WikiText-2 perplexity (log scale)")
    if y == "perplexity":
        axes.set_yscale("log")
        plain_log_ticks(axes.yaxis)
    axes.grid(alpha=0.3, which="both" if y == "perplexity" else "major")
    if entries:
        handles, labels, headings = [], [], []
        for family in ("dense", *FAMILIES):
            if family in entries:
                if family != "dense":  # a heading per family, in bold
                    headings.append(len(labels))
                    handles.append(Line2D([], [], linestyle="none"))
                    labels.append(FAMILY_HEADINGS[family])
                for handle, label in entries[family]:
                    handles.append(handle)
                    labels.append(label)
        legend = axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=10,
                             frameon=False, handlelength=2.6, borderaxespad=0)
        for index in headings:
            legend.get_texts()[index].set_fontweight("bold")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def write_comparison(out: Path, model: str) -> dict:
    """Collect every finished stage of every method in `out`; write report.md, results.json and the plots."""
    results = collect_comparison(out)
    if not results["methods"]:
        raise ValueError(f"{out} holds no method yet")
    settings = json.loads((out / "compare.json").read_text())["identity"]
    write_json_atomic(out / "results.json", {"model": model, **results})
    plot_comparison(results, "average", "compression", "compression (% of parameters removed)", 100,
                    out / "accuracy_vs_compression.png")
    plot_comparison(results, "perplexity", "compression", "compression (% of parameters removed)", 100,
                    out / "perplexity_vs_compression.png")
    plot_comparison(results, "average", "latency_s", "end-to-end latency (s, 128 tokens)", 1,
                    out / "accuracy_vs_latency.png")
    if results.get("speedups"):  # quality at equal speed
        for y, name in (("average", "accuracy"), ("perplexity", "perplexity")):
            plot_comparison(results, y, "speedup", "measured speedup over the dense model (×)", 1,
                            out / f"{name}_vs_speedup.png")
    (out / "report.md").write_text(comparison_markdown(results, model, settings))
    return results
