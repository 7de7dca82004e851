"""The model card (README.md) of every checkpoint mop writes, made with huggingface_hub's `ModelCard`: hub
metadata, how the checkpoint was made (read from its `mop.json` and config), how to load and serve it, and —
once `mop run`, `mop compare`, `mop eval` or `mop bench` measured it — the measured numbers as `model-index`
results.

`write_card` runs when a checkpoint is saved; `add_results` rewrites the card with a new evaluation or latency
record, keeping the results measured before. A record is only added when its weights digest is the
checkpoint's: a card never shows a number that was not measured on its own weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoConfig, PretrainedConfig

from mop.provenance import write_json_atomic

log = logging.getLogger(__name__)

EMBEDDED_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # mop.models.loading.EMBEDDED's models
# each accuracy task's data set as lm-eval's task YAML names it (dataset_path, dataset_name, the split it
# evaluates), and its usual title
TASK_DATASETS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", "ARC-Challenge"),
    "hellaswag": ("Rowan/hellaswag", None, "validation", "HellaSwag"),
    "piqa": ("baber/piqa", None, "validation", "PIQA"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", "WinoGrande"),
}
METRIC_NAMES = {"acc": "accuracy", "acc_norm": "length-normalized accuracy", "perplexity": "perplexity",
                "speedup": "end-to-end speedup"}
PATH_STEPS = "D: one decoder layer removed; W: attention heads and MLP neurons removed from every layer"
# what the mop.json of every pruning method holds (a checkpoint saved with less is described without them)
PRUNING_RECORD = ("path", "target", "seed", "compression_of", "iterations", "compression", "non_embedding_compression",
                  "params", "original_params")


def base_model(name: str) -> str:
    """The hub id of a source model as mop was given it: the embedded model's id, a hub id as it is, or for a
    local directory its name (replace it by the source's hub id before pushing the card to the hub)."""
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    path = Path(name)
    if path.exists():
        return path.resolve().name
    if name.startswith((".", "/")) or name.count("/") != 1:
        return path.name
    return name


def method_label(provenance: dict) -> str:
    """`mop` with its mode (`mop`, `mop-depth`, `mop-width`), or the peer method's name (`shortgpt`, ...)."""
    if "method" in provenance:
        return provenance["method"]
    mode = provenance.get("mode", "mop")
    return "mop" if mode == "mop" else f"mop-{mode}"


def _pct(ratio: float) -> str:
    return f"{100 * ratio:.2f}%"


def _pruning(provenance: dict) -> list[str]:
    """The pruning lines of "How it was made": method and settings, target, path, sizes, calibration,
    compensation."""
    settings = provenance.get("config") or provenance.get("settings") or {}
    if "criteria" in provenance:
        criteria = provenance["criteria"]
        method = (f"MoP (`--mode {provenance['mode']}`): layer criterion `{criteria['layer']}`, width criterion "
                  f"`{criteria['width']}`, path criterion `{criteria['path']}`")
    else:
        method = f"`{method_label(provenance)}`"
    method += "".join(f", {key} `{value}`" for key, value in settings.items()
                      if key in ("tensor_parallel", "mlp_multiple") and value != 1)
    measure = "all" if provenance["compression_of"] == "all" else "the non-embedding"
    lines = [f"- **Method**: {method}; seed {provenance['seed']}.",
             f"- **Target**: {provenance['target']} of {measure} parameters; {len(provenance['iterations'])} "
             "iterations.",
             f"- **Path**: `{provenance['path'] or '(none)'}` ({PATH_STEPS}).",
             f"- **Compression**: {_pct(provenance['compression'])} of all parameters, "
             f"{_pct(provenance['non_embedding_compression'])} of the non-embedding parameters; "
             f"{provenance['params']:,} parameters left of {provenance['original_params']:,}."]
    whole = provenance.get("whole_model")
    if whole and whole["params"] != provenance["params"]:
        lines.append(f"- **Whole model** (the vision tower and projector are not pruned): {whole['params']:,} "
                     f"parameters of {whole['original_params']:,} ({_pct(whole['compression'])} removed).")
    if "calib" in settings:
        lines.append(f"- **Calibration**: {settings['calib_samples']} texts of `{settings['calib']}`, at most "
                     f"{settings['calib_max_length']} tokens each.")
    if "compensation" in provenance:
        compensation = provenance["compensation"]
        method = compensation.get("method") if isinstance(compensation, dict) else None
        lines.append(f"- **Compensation**: `{method or 'recorded'}` (settings and per-layer errors in `mop.json`, "
                     "`compensation`).")
    return lines


def _shape(config: PretrainedConfig) -> str:
    text = config.get_text_config()
    return (f"- **Shape**: {text.num_hidden_layers} layers, {text.num_attention_heads} attention heads, "
            f"{text.num_key_value_heads} KV heads, MLP width {text.intermediate_size}, hidden size {text.hidden_size}.")


RECOVERY_KINDS = {"lora": "LoRA", "full": "full-parameter"}  # FinetuneConfig.trainable → its words in a card


def _trainable(finetune: dict) -> str:
    """What a fine-tune trained, `lora` or `full` (records made before the option are LoRA)."""
    return finetune["settings"].get("trainable", "lora")


def _recovery(finetune: dict | None) -> str:
    if finetune is None:
        return "- **Recovery**: none (the pruned weights as they are)."
    data, lora = finetune["data"], finetune["settings"]["lora"]
    teacher = f", distilled from `{finetune['teacher']['name']}`" if finetune.get("teacher") else ""
    trainable = _trainable(finetune)
    adapters = ("every weight of the language model trained" if trainable == "full" else
                f"rank {lora['rank']}, alpha {lora['alpha']}, dropout {lora['dropout']}; merged into the weights")
    return (f"- **Recovery**: {RECOVERY_KINDS[trainable]} {finetune['method']}{teacher}, {finetune['steps']} steps "
            f"of {lora['batch_size']} examples of at most {lora['max_length']} tokens from `{data['data']}` "
            f"({finetune['epochs']:.3g} epochs), learning rate {lora['learning_rate']}, {adapters}.")


def _reproduce(provenance: dict) -> list[str]:
    """The recorded command lines (`mop.provenance.command`): the pruning's, then the recovery's if another."""
    commands = [provenance.get("command")]
    if provenance.get("finetune") is not None:
        commands.append(provenance["finetune"].get("command"))
    if not any(commands):
        return ["Written through mop's Python API: no command line was recorded; the settings above and "
                "`mop.json` are the full record."]
    lines = ["```bash", *dict.fromkeys(c for c in commands if c), "```"]
    if None in commands:
        lines.append("(One step went through mop's Python API and has no recorded command; see `mop.json`.)")
    return lines


def _usage(name: str, multimodal: bool) -> list[str]:
    """How to load the checkpoint (directory `name`) in transformers and serve it in vLLM."""
    if multimodal:
        load = ["from transformers import AutoProcessor, LlavaForConditionalGeneration",
                "model = LlavaForConditionalGeneration.from_pretrained(checkpoint)",
                "processor = AutoProcessor.from_pretrained(checkpoint)"]
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                "model = AutoModelForCausalLM.from_pretrained(checkpoint)",
                "tokenizer = AutoTokenizer.from_pretrained(checkpoint)"]
    return ["A plain transformers checkpoint, no custom code:", "", "```python", *load[:1],
            f'checkpoint = "path/to/{name}"  # this directory, or the hub id it was pushed to', *load[1:], "```", "",
            "Served by vLLM (`mop check` compares its greedy decoding with transformers'):", "",
            "```bash", f"vllm serve path/to/{name}", "```"]


def _measured_how(result: EvalResult) -> str:
    """The table cell that says how a result was measured: documents, segments, or runs."""
    args = result.dataset_args or {}
    if result.metric_type == "perplexity":
        return f"{args['segments']} segments of {args['segment_length']} tokens ({args['tokens_scored']:,} tokens scored)"
    if result.metric_type == "speedup":
        return (f"± {args['std']:.2f} over {args['runs_kept']} runs, against `{args['baseline']}`; {args['device']}, "
                f"{args['dtype']}")
    stderr = f", standard error {100 * args['stderr']:.2f} points" if args.get("stderr") is not None else ""
    return f"{args['documents']} documents, {args['num_fewshot']}-shot{stderr}"


def _results_lines(results: list[EvalResult]) -> list[str]:
    """The Results section: a table of the measured numbers, then the protocols they were measured by."""
    if not results:
        return ["Not measured yet: `mop eval` (or `mop run`) adds the measured numbers here."]
    lines = ["Measured on this checkpoint's weights (the `model-index` above holds the same numbers):", "",
             "| task | data | metric | value | measured on |", "|---|---|---|---|---|"]
    for result in results:
        value = (f"{100 * result.metric_value:.2f}%" if result.metric_type.startswith("acc")
                 else f"{result.metric_value:.3f}" + ("×" if result.metric_type == "speedup" else ""))
        lines.append(f"| {result.task_name} | {result.dataset_name} | {result.metric_name} | {value} | "
                     f"{_measured_how(result)} |")
    protocols = [f"- {result.task_name}: {result.dataset_args['protocol']}" for result in results
                 if "protocol" in (result.dataset_args or {})]
    if any(result.metric_type.startswith("acc") for result in results):
        protocols.insert(0, "- accuracy: zero-shot, lm-evaluation-harness's own task definitions")
    return [*lines, "", "Protocols:", "", *protocols]


def card(provenance: dict, config: PretrainedConfig, directory_name: str, results: list[EvalResult] = ()
         ) -> ModelCard:
    """The card of a checkpoint with this `mop.json` (`provenance`) and config, in a directory named
    `directory_name` (the card does not depend on where the directory is): a pruned checkpoint (recovered or
    not), a model mop did not prune that `mop finetune` recovered, or a bare save (a `mop.json` of neither)."""
    pruned, finetune = all(key in provenance for key in PRUNING_RECORD), provenance.get("finetune")
    source = provenance.get("source", {}).get("name") or (finetune or {}).get("model") or "unknown"
    base = base_model(source)
    method = method_label(provenance) if pruned else "finetune" if finetune else "mop"
    multimodal = config.get_text_config() is not config  # a vision-language model's config holds a text config
    size = f"{round(100 * provenance['compression'])}pct" if pruned else finetune["method"] if finetune else "copy"
    name = f"{base.split('/')[-1]}-{method}-{size}"
    data = ModelCardData(base_model=base, library_name="transformers",
                         pipeline_tag="image-text-to-text" if multimodal else "text-generation",
                         tags=list(dict.fromkeys(["mop", *(["pruned", method] if pruned else []),
                                                  *(["llava"] if multimodal else []),
                                                  *([f"{_trainable(finetune)}-recovered"] if finetune else [])])),
                         model_name=name, eval_results=list(results) or None)
    if pruned:
        recovered = f" and recovered by {RECOVERY_KINDS[_trainable(finetune)]} fine-tuning" if finetune else ""
        summary = (f"`{base}` structurally pruned by mop (mixture-of-pruners) with `{method}`{recovered}: "
                   f"{_pct(provenance['compression'])} of its parameters removed.")
    elif finetune:
        summary = (f"`{base}` fine-tuned by mop's {RECOVERY_KINDS[_trainable(finetune)]} recovery (`mop finetune`), "
                   "not pruned by mop.")
    else:
        summary = f"`{base}` written by mop; its `mop.json` records no pruning and no recovery."
    lines = [f"# {name}", "", summary, "",
             "## How it was made", "", *(_pruning(provenance) if pruned else []), _shape(config),
             _recovery(provenance.get("finetune")), "",
             "## Reproduce", "", *_reproduce(provenance), "",
             "## Use", "", *_usage(directory_name, multimodal), "",
             "## Results", "", *_results_lines(list(results)), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_card(directory: Path, provenance: dict, config: PretrainedConfig, directory_name: str) -> None:
    """Write `directory`/README.md for a checkpoint that will live in a directory named `directory_name`."""
    _save(card(provenance, config, directory_name), directory / "README.md")


def _save(model_card: ModelCard, path: Path) -> None:
    """`model_card` into `path` through a `.partial` sibling and a rename (a kill leaves the old card or the new)."""
    partial = path.with_name(path.name + ".partial")
    model_card.save(partial)
    partial.replace(path)


# ---------------------------------------------------------------- measured results


def evaluation_results(record: dict) -> list[EvalResult]:
    """The `model-index` results of a `mop eval` record: WikiText-2 perplexity with its protocol, and each
    accuracy task's paper metric (acc for WinoGrande, acc_norm for the others) with its documents."""
    from mop.evaluation import PAPER_METRIC, PERPLEXITY_TASK

    results = []
    for task, measured in record["tasks"].items():
        if task == PERPLEXITY_TASK:
            standard = measured["data"] == "wikitext2"
            results.append(EvalResult(
                task_type="text-generation", task_name="language modeling", dataset_type="wikitext",
                dataset_name="WikiText-2" if standard else measured["data"],
                dataset_config="wikitext-2-raw-v1" if standard else None, dataset_split="test" if standard else None,
                dataset_args={"segments": measured["segments"], "segment_length": measured["segment_length"],
                              "tokens_scored": measured["tokens_scored"], "protocol": measured["protocol"]},
                metric_type="perplexity", metric_name="perplexity", metric_value=measured["perplexity"]))
            continue
        dataset, config, split, title = TASK_DATASETS[task]
        metric = PAPER_METRIC.get(task, "acc_norm")
        results.append(EvalResult(
            task_type="multiple-choice", task_name=task, dataset_type=dataset, dataset_name=title,
            dataset_config=config, dataset_split=split,
            dataset_args={"documents": measured["samples"], "num_fewshot": 0, "harness": "lm-evaluation-harness",
                          "stderr": measured.get(f"{metric}_stderr")},
            metric_type=metric, metric_name=METRIC_NAMES[metric], metric_value=measured[metric]))
    return results


def latency_results(record: dict) -> list[EvalResult]:
    """The end-to-end speedup of a `mop bench` record against its baseline (none without a baseline)."""
    if record["speedup"] is None:
        return []
    settings, speedup = record["settings"], record["speedup"]
    return [EvalResult(
        task_type="text-generation", task_name="latency", dataset_type="mop-latency-prompt",
        dataset_name=f"fixed {settings['prompt_tokens']}-token prompt, {settings['new_tokens']} greedy tokens",
        dataset_args={"baseline": record["models"]["baseline"]["name"], "std": speedup["std"],
                      "runs_kept": speedup["runs"], "device": record["device"], "dtype": record["dtype"],
                      "protocol": record["protocol"]},
        metric_type="speedup", metric_name=METRIC_NAMES["speedup"], metric_value=speedup["mean"])]


def _key(result: EvalResult) -> tuple:
    return result.dataset_type, result.dataset_config, result.metric_type


def predicted_in(provenance: dict) -> str:
    """The engine whose latency model predicted a speed target's `predicted_speedup` (`mop.json`)."""
    return provenance.get("latency_model", {}).get("context", {}).get("engine", "transformers")


def record_measured_speedup(directory: Path, latency: dict) -> None:
    """Beside the `predicted_speedup` of a speed target's `mop.json` in `directory`, the speedup that `latency` (a
    `mop bench` record, transformers' or vLLM's) measured (`measured_speedup`), when it was measured in the engine
    the prediction was made for; any other checkpoint or record is left alone."""
    path = directory / "mop.json"
    provenance = json.loads(path.read_text()) if path.is_file() else {}
    engine = latency.get("engine", "transformers")
    if "predicted_speedup" not in provenance or latency["speedup"] is None or engine != predicted_in(provenance):
        return
    speedup = latency["speedup"]
    dtype = latency["dtype"] if "dtype" in latency else latency["settings"]["dtype"]  # vLLM's: a setting
    provenance["measured_speedup"] = {"mean": speedup["mean"], "std": speedup["std"], "engine": engine,
                                      "device": latency["device"], "dtype": dtype}
    write_json_atomic(path, provenance)


def add_results(directory: Path, weights_sha256: str, evaluation: dict | None = None,
                latency: dict | None = None) -> None:
    """Rewrite the card of the mop checkpoint in `directory` (whose weights digest is `weights_sha256`) with
    the results of `evaluation` and `latency` that were measured on these weights, replacing earlier results of
    the same data set and metric. A checkpoint of a run with speed targets gets the measured speedup beside the
    predicted one (`record_measured_speedup`). A directory without `mop.json` (a model mop did not write) is left
    alone."""
    if not (directory / "mop.json").is_file():
        return
    provenance = json.loads((directory / "mop.json").read_text())
    new = []
    if evaluation is not None and evaluation["model"]["weights_sha256"] == weights_sha256:
        new += evaluation_results(evaluation)
    if latency is not None and latency["models"]["candidate"]["weights_sha256"] == weights_sha256:
        new += latency_results(latency)
        record_measured_speedup(directory, latency)
    if not new:
        return
    readme = directory / "README.md"
    earlier = (ModelCard.load(readme).data.eval_results or []) if readme.is_file() else []
    keys = {_key(result) for result in new}
    results = [result for result in earlier if _key(result) not in keys] + new
    _save(card(provenance, AutoConfig.from_pretrained(directory), directory.resolve().name, results), readme)
    log.info("%s: model card updated with %d measured result(s)", readme, len(new))
