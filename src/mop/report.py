"""The report of `mop run`: OUT/report.md (tables), OUT/results.json (the numbers behind them) and three plots —
accuracy vs compression, accuracy vs latency, and the depth/width path of every seed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from mop.evaluation import PAPER_METRIC, PERPLEXITY_TASK  # noqa: E402
from mop.pruning.search import target_name  # noqa: E402
from mop.provenance import write_json_atomic  # noqa: E402

PATH_COLOURS = {"D": "#c0504d", "W": "#4f81bd"}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def task_scores(evaluation: dict) -> dict[str, float]:
    """Per accuracy task, the paper's metric (acc for WinoGrande, acc_norm for the others), in [0, 1]."""
    return {task: metrics[PAPER_METRIC.get(task, "acc_norm")]
            for task, metrics in evaluation["tasks"].items() if task != PERPLEXITY_TASK}


def result_row(evaluation: dict, provenance: dict | None, latency: dict | None) -> dict:
    """One checkpoint's numbers: compression, parameters, path, perplexity, task scores, average, latency."""
    perplexity = evaluation["tasks"].get(PERPLEXITY_TASK, {}).get("perplexity")
    row = {"params": evaluation["model"]["params"], "perplexity": perplexity, "tasks": task_scores(evaluation),
           "average": evaluation["average"]}
    if provenance is not None:
        row.update(compression=provenance["compression"], path=provenance["path"],
                   non_embedding_compression=provenance["non_embedding_compression"],
                   recovery_steps=(provenance.get("finetune") or {}).get("steps"))
    if latency is not None:
        row.update(latency_s=latency["models"]["candidate"]["end_to_end_s"]["mean"],
                   decode_ms_per_token=latency["models"]["candidate"]["decode_ms_per_token"]["mean"],
                   baseline_latency_s=latency["models"]["baseline"]["end_to_end_s"]["mean"],
                   speedup=latency["speedup"]["mean"], speedup_std=latency["speedup"]["std"],
                   device=latency["device"], dtype=latency["dtype"])
    return row


def collect(out: Path, targets: list[float], seeds: list[int], recovered: bool) -> dict:
    """Every finished checkpoint's row, per target name and seed, and the dense model's."""
    rows: dict[str, dict[int, dict]] = {}
    for target in sorted(targets):
        name = target_name(target)
        for seed in seeds:
            seed_dir = out / f"seed-{seed}"
            checkpoint = seed_dir / ("recovered" if recovered else "prune") / name
            evaluation = _read(seed_dir / "eval" / f"{name}.json")
            if evaluation is not None:
                rows.setdefault(name, {})[seed] = result_row(
                    evaluation, _read(checkpoint / "mop.json"), _read(seed_dir / "bench" / f"{name}.json"))
    dense = result_row(_read(out / "dense" / "eval.json"), None, None)
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


def _cells(rows: list[dict], tasks: list[str]) -> list[str]:
    """Table cells of one or more rows of the same checkpoint (mean ± std when several seeds)."""
    get = lambda key: [r.get(key) for r in rows]
    return [
        _mean_std(get("compression"), 100), f"{statistics.mean(get('params')) / 1e6:.2f} M",
        " ".join(f"`{r['path']}`" for r in rows if r.get("path")) or "–",
        _mean_std(get("perplexity"), digits=2),
        *[_mean_std([r["tasks"].get(t) for r in rows], 100) for t in tasks],
        _mean_std(get("average"), 100),
        _mean_std(get("speedup"), digits=2) + "×" if any(r.get("speedup") for r in rows) else "–",
    ]


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
        lines += ["## Latency", "",
                  f"Batch 1, a {settings['latency']['prompt_tokens']}-token prompt, {settings['latency']['new_tokens']} "
                  f"generated tokens, {settings['latency']['runs']} runs of which the first "
                  f"{settings['latency']['warmup']} are discarded; dense and pruned timed alternately in one process; "
                  f"{timed[0]['device']}, {timed[0]['dtype']}. Dense: {dense.get('latency_s', float('nan')):.3f} s. "
                  "Times are those of mop's own greedy loop (exactly that many tokens, EOS not stopping it, no "
                  "logits processors; the same tokens as greedy `generate`), which isolates the forward passes "
                  "pruning speeds up; `model.generate` is timed too, and its speedup is in "
                  "`seed-S/bench/target-XX.json` (`generate_speedup`).", "",
                  *_table(["target", "seed", "end-to-end s", "decode ms/token", "speedup"],
                          [[name, f"seed {seed}", f"{r['latency_s']:.3f}", f"{r['decode_ms_per_token']:.2f}",
                            f"{r['speedup']:.2f} ± {r['speedup_std']:.2f}×"]
                           for name, per_seed in checkpoints.items() for seed, r in sorted(per_seed.items())
                           if "latency_s" in r]), ""]
    lines += ["## Settings", "", "```json", json.dumps(settings, indent=1), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _quality(row: dict) -> tuple[float | None, str]:
    """The y value of the plots: the average accuracy (%) when accuracy tasks ran, else the perplexity."""
    if row["average"] is not None:
        return 100 * row["average"], "average accuracy (%)"
    return row["perplexity"], "WikiText-2 perplexity"


def plot_accuracy(results: dict, x_key: str, x_label: str, x_scale: float, out: Path) -> None:
    dense, checkpoints = results["dense"], results["checkpoints"]
    figure, axes = plt.subplots(figsize=(6, 4))
    label = _quality(dense)[1]
    if dense.get(x_key) is not None:
        axes.scatter([dense[x_key] * x_scale], [_quality(dense)[0]], marker="*", s=160, color="black", label="dense")
    seeds = sorted({seed for per_seed in checkpoints.values() for seed in per_seed})
    for seed in seeds:
        points = sorted((r[x_key] * x_scale, _quality(r)[0]) for per_seed in checkpoints.values()
                        for s, r in per_seed.items() if s == seed and r.get(x_key) is not None)
        if points:
            axes.plot(*zip(*points), marker="o", alpha=0.8, label=f"MoP seed {seed}")
    axes.set_xlabel(x_label)
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
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


def write_report(out: Path, model: str, config) -> dict:
    """Collect every finished stage of the run in `out`, write report.md, results.json and the plots."""
    settings = json.loads(json.dumps(config.identity()))
    results = collect(out, config.search.targets, config.seeds, config.recovery is not None)
    write_json_atomic(out / "results.json", {"model": model, "seeds": config.seeds, **results})
    plot_accuracy(results, "compression", "compression (% of parameters removed)", 100,
                  out / "accuracy_vs_compression.png")
    plot_accuracy(results, "latency_s", "end-to-end latency (s, 128 tokens)", 1, out / "accuracy_vs_latency.png")
    plot_paths(results, out / "paths.png")
    (out / "report.md").write_text(markdown(results, model, settings))
    return results
