"""The `mop` command line.

Every user error ends the command with one line `mop: error: ...` on stderr and exit status 2, before any
output is touched: numeric options are checked as argparse parses them (`OPTION_VALUES`), the rest by the
commands' settings before a model loads. An unexpected error prints one line too (exit status 1); its traceback
goes to the command's log file (see `mop.logs`), and to the terminal with `-v`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mop import logs, recipes
from mop.errors import MopError
from mop.plugins import load_plugins
from mop.pruning.compensation import DEFAULT_DEPTH_RIDGE, DEFAULT_RIDGE, METHODS as COMPENSATIONS
from mop.provenance import invoked_as
from mop.pruning.criteria import LAYER_CRITERIA, PATH_CRITERIA, WIDTH_CRITERIA
from mop.latency.model import ENGINES
from mop.pruning.search import COMPRESSIONS, MODES, SearchConfig
from mop.training.recovery import TRAINABLE

log = logging.getLogger("mop.cli")  # not __name__: `python -m mop.cli` runs it as __main__
TRAINABLE_HELP = ("what recovery trains: lora, adapters merged at the end (the paper's), or full, every weight of "
                  "the language model, embeddings included (for small models: weights, gradients and AdamW's two "
                  "moments take about 4x the weights' memory)")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are MopErrors: one line, no usage block."""

    def error(self, message: str):
        raise MopError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------- option values


def _checked(convert: Callable[[str], object], valid: Callable, expected: str) -> Callable[[str], object]:
    """An argparse type: `convert(text)`, refused in one line unless it is `valid`."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}")
        return value

    parse.__name__ = expected
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
at_least_two = _checked(int, lambda v: v >= 2, "an integer >= 2")
at_least_three = _checked(int, lambda v: v >= 3, "an integer >= 3")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "a positive number")
ratio = _checked(float, lambda v: 0 < v < 1, "a ratio in (0, 1)")
speedup = _checked(float, lambda v: 1 < v < math.inf, "a speedup above 1")
probability = _checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
rng_seed = _checked(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")


def device(text: str) -> str:
    """An argparse type: auto, or a device torch knows (cpu, cuda, cuda:1, mps, ...)."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, auto or another torch device, "
                                             f"not {text!r}") from None
    return text


# The values each numeric option accepts, by option name (the same in every command that has the option).
# `build_parser` makes them the options' argparse types, so a value out of range fails as it is parsed, in one
# line, before any model loads; every numeric option must have an entry (tests/test_cli_fuzz.py checks).
OPTION_VALUES: dict[str, Callable[[str], object]] = {
    "--device": device, "--seed": rng_seed, "--target": ratio, "--target-speedup": speedup,
    # mop prune, mop run
    "--calib-samples": positive_int, "--calib-max-length": positive_int, "--batch-size": positive_int,
    "--path-samples": positive_int, "--path-max-length": positive_int, "--ppl-segment-length": at_least_two,
    "--ppl-segments": positive_int, "--tune-steps": non_negative_int, "--tune-batch-size": positive_int,
    "--tune-micro-batch-size": positive_int, "--tune-max-length": positive_int, "--tensor-parallel": positive_int,
    "--mlp-multiple": positive_int,
    # mop finetune
    "--epochs": positive_float, "--max-steps": positive_int, "--micro-batch-size": positive_int,
    "--lr": positive_float, "--max-length": positive_int, "--rank": positive_int, "--alpha": positive_int,
    "--dropout": probability, "--save-every": positive_int, "--kd-temperature": positive_float,
    "--weight-decay": non_negative_float,
    # mop eval
    "--limit": positive_int,
    # mop bench
    "--runs": positive_int, "--warmup": non_negative_int, "--prompt-tokens": positive_int,
    "--new-tokens": at_least_two, "--prefill-tokens": positive_int, "--batch": positive_int,
    "--batch-runs": at_least_three,
    # mop run
    "--recovery-epochs": positive_float, "--recovery-steps": positive_int, "--recovery-batch-size": positive_int,
    "--recovery-micro-batch-size": positive_int, "--recovery-max-length": positive_int, "--recovery-lr": positive_float,
    "--recovery-dropout": probability,
    "--compensation-ridge": positive_float, "--compensation-depth-ridge": positive_float,
    "--recovery-weight-decay": non_negative_float,
    "--eval-limit": positive_int, "--eval-batch-size": positive_int, "--eval-ppl-segment-length": at_least_two,
    "--eval-ppl-segments": positive_int, "--bench-runs": positive_int, "--bench-warmup": non_negative_int,
    "--bench-batch": positive_int,
    # mop check
    "--max-new-tokens": positive_int, "--top-logprobs": positive_int, "--atol": positive_float,
}


def _apply_option_values(parser: argparse.ArgumentParser) -> None:
    """Give every option named in OPTION_VALUES its checked type, in `parser` and its commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _apply_option_values(command)
        for name in action.option_strings:
            if name in OPTION_VALUES:
                action.type = OPTION_VALUES[name]


# ---------------------------------------------------------------- commands


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a checkpoint directory, a hub id, or smollm2-135m")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (spread over the GPUs; no offloading)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def build_parser(recipe: str = "paper") -> argparse.ArgumentParser:
    """The full command line, with `recipe`'s defaults; the criteria and methods that plugins register must be
    loaded before."""
    parser = Parser(prog="mop", description="Structured pruning of LLaMA-family models with MoP.")
    commands = parser.add_subparsers(dest="command", required=True)
    for register in (register_prune, register_finetune, register_bench, register_eval, register_run,
                     register_compare, register_check):
        register(commands)
    for command in commands.choices.values():
        _add_common_options(command)
    _apply_option_values(parser)
    recipes.apply(parser, recipe)
    return parser


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options of every command, read before the parser is built (see `main`)."""
    common = parser.add_argument_group("messages and plugins")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' messages and warnings on the terminal too (they always go to the "
                             "log file), and the traceback of an unexpected error")
    common.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, so the criteria or pruning methods it registers can be named "
                             "(repeatable); installed `mop.plugins` entry points are always imported")


def register_prune(commands) -> None:
    prune = commands.add_parser("prune", help="search a depth/width pruning path and write a checkpoint per target")
    _add_model_options(prune)
    prune.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds this run)")
    prune.add_argument("--seed", type=int, default=0)
    _add_search_options(prune)
    prune.set_defaults(handler=cmd_prune)


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    """The options of the MoP search, shared by `mop prune` and `mop run`."""
    recipes.add_recipe_option(parser)
    parser.add_argument("--target", type=float, action="append", default=[],
                        help="compression ratio in (0, 1); repeat for several checkpoints from one search")
    parser.add_argument("--target-speedup", type=float, action="append", default=[], metavar="S",
                        help="predicted speedup over the dense model (> 1; checkpoint speedup-XXX), beside or instead "
                             "of --target; repeatable. Width steps then match the depth step's predicted latency")
    parser.add_argument("--latency-model", default=None, metavar="FILE",
                        help="the latency model that predicts speedups (a record as mop.json's latency_model); "
                             "default: measured on --device and --dtype, cached under $MOP_CACHE_DIR/latency")
    parser.add_argument("--latency-engine", default="transformers", choices=ENGINES,
                        help="what the measured latency model times: our greedy loop in transformers, or vLLM (its "
                             "own environment, see `mop check`)")
    parser.add_argument("--method", default="mop",
                        help="pruning method: mop (the paper's search, see --mode) or a peer (shortgpt, ...)")
    parser.add_argument("--mode", default="mop", choices=MODES, help="mop's mode: the mixture, depth only, width only")
    parser.add_argument("--compression-of", default="all", choices=COMPRESSIONS,
                        help="what --target measures: all parameters (the paper's c = 1 - P/P0) or the body "
                             "(non-embedding parameters)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="keep query and KV head counts and the MLP width shardable over N devices (vLLM's "
                             "rules); the model must start so")
    parser.add_argument("--mlp-multiple", type=int, default=1, metavar="A",
                        help="keep every shard's MLP width a multiple of A neurons (64 or 128: GEMM-friendly)")
    parser.add_argument("--path-criterion", default="random", choices=sorted(PATH_CRITERIA))
    parser.add_argument("--layer-criterion", default="third_to_last", choices=sorted(LAYER_CRITERIA))
    parser.add_argument("--width-criterion", default="amp", choices=sorted(WIDTH_CRITERIA))
    parser.add_argument("--compensation", default="none", choices=COMPENSATIONS,
                        help="repair every cut in closed form from the calibration activations (lstsq) or not")
    parser.add_argument("--compensation-ridge", type=float, default=DEFAULT_RIDGE,
                        help="the ridge of a width repair, a share of the mean diagonal of the kept inputs' Gram")
    parser.add_argument("--compensation-depth-ridge", type=float, default=DEFAULT_DEPTH_RIDGE,
                        help="the ridge of a depth repair, a share of the mean diagonal of its inputs' Gram")
    parser.add_argument("--calib", default="alpaca",
                        help="calibration data (AMP, block influence, compensation): alpaca, c4, wikitext2-valid or a file")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-max-length", type=int, default=512)
    parser.add_argument("--calib-packed", action="store_true",
                        help="calibrate on --calib-samples windows of exactly --calib-max-length tokens of the joined "
                             "texts (GPTQ's and SparseGPT's calibration) instead of one text, truncated, per prompt")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per scoring forward pass")
    parser.add_argument("--path-data", default="wikitext2", help="data for the cosine/kl/ppl path criteria")
    parser.add_argument("--path-samples", type=int, default=128, help="texts for cosine and kl")
    parser.add_argument("--path-max-length", type=int, default=512, help="tokens per text for cosine and kl")
    parser.add_argument("--ppl-segment-length", type=int, default=2048)
    parser.add_argument("--ppl-segments", type=int, default=None, help="limit the perplexity segments (default: all)")
    parser.add_argument("--tune-data", default="alpaca", help="Alpaca-format data for the candidates' short tuning")
    parser.add_argument("--tune-steps", type=int, default=10, help="iteration t tunes each candidate for this × t steps")
    parser.add_argument("--tune-batch-size", type=int, default=16)
    parser.add_argument("--tune-micro-batch-size", type=int, default=4)
    parser.add_argument("--tune-max-length", type=int, default=512)
    parser.add_argument("--no-activation-checkpointing", action="store_true",
                        help="keep every layer's activations while training LoRA: faster, much more memory")


def _search_config(args: argparse.Namespace, seed: int) -> SearchConfig:
    """The validated search settings of a `prune` or `run` command line (bad options fail before a model loads)."""
    from mop.training import LoraSettings

    config = SearchConfig(
        targets=args.target, speedups=args.target_speedup, latency_model=args.latency_model,
        latency_engine=args.latency_engine, method=args.method,
        mode=args.mode, layer_criterion=args.layer_criterion,
        width_criterion=args.width_criterion, path_criterion=args.path_criterion, seed=seed,
        compression_of=args.compression_of, compensation=args.compensation,
        compensation_ridge=args.compensation_ridge, compensation_depth_ridge=args.compensation_depth_ridge,
        calib=args.calib,
        calib_samples=args.calib_samples, calib_max_length=args.calib_max_length, calib_packed=args.calib_packed,
        batch_size=args.batch_size, path_data=args.path_data, path_samples=args.path_samples, path_max_length=args.path_max_length,
        ppl_segment_length=args.ppl_segment_length, ppl_segments=args.ppl_segments, tune_data=args.tune_data,
        tune_steps_per_iteration=args.tune_steps, tensor_parallel=args.tensor_parallel, mlp_multiple=args.mlp_multiple,
        lora=LoraSettings(batch_size=args.tune_batch_size, micro_batch_size=args.tune_micro_batch_size,
                          max_length=args.tune_max_length, activation_checkpointing=not args.no_activation_checkpointing),
    )
    config.validate()
    from mop.pruning.methods import known

    known(config.method)
    from mop import data

    _check_data(config.calib, config.path_data, read=data.load_calibration)
    _check_data(config.tune_data, read=data.load_examples)
    return config


def _check_data(*specs: str, read: Callable[[str], object]) -> None:
    """Fail before a model loads on a data option that names neither a file nor a known data set, or a file on
    disk that `read` (how the command reads it) refuses: empty, binary, wrong fields."""
    from mop import data

    for spec in specs:
        if data.local_path(spec) is not None:
            read(spec)


def _check_training_data(config) -> None:
    """The data a FinetuneConfig trains on: Alpaca rows (sft), or raw text (kd)."""
    from mop import data

    if config.method == "sft":
        _check_data(config.data, read=data.load_examples)
    else:
        _check_data(config.kd_data, read=data.load_texts)


def cmd_prune(args: argparse.Namespace) -> None:
    from mop.models import load_model
    from mop.pruning import methods

    config = _search_config(args, args.seed)
    loaded = load_model(args.model, args.device, args.dtype)
    state = methods.prune(loaded, config, args.out)
    print_summary(state)


def register_finetune(commands) -> None:
    finetune = commands.add_parser("finetune", help="recovery fine-tuning with LoRA (merged) or of every weight, "
                                                    "into a plain checkpoint (resumable; runs on several processes "
                                                    "under accelerate launch)")
    _add_model_options(finetune)
    finetune.add_argument("--out", type=Path, required=True,
                          help="checkpoint directory to write; an interrupted run resumes from OUT.finetune-state")
    finetune.add_argument("--method", default="sft", choices=["sft", "kd"],
                          help="sft: learn Alpaca responses; kd: match the teacher's logits on raw text")
    finetune.add_argument("--trainable", default="lora", choices=TRAINABLE, help=TRAINABLE_HELP)
    finetune.add_argument("--data", default="alpaca", help="sft data: alpaca or an Alpaca-format file")
    finetune.add_argument("--epochs", type=float, default=2.0)
    finetune.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    finetune.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step, all processes")
    finetune.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward/backward")
    finetune.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (the paper's LoRA 3e-4)")
    finetune.add_argument("--max-length", type=int, default=512, help="tokens per example")
    finetune.add_argument("--rank", type=int, default=None,
                          help="LoRA rank (default 32; on a vision-language model 8)")
    finetune.add_argument("--alpha", type=int, default=None,
                          help="LoRA alpha (default 10; on a vision-language model 16)")
    finetune.add_argument("--dropout", type=float, default=0.05)
    finetune.add_argument("--weight-decay", type=float, default=0.01,
                          help="AdamW weight decay (torch's default 0.01; the reference recipe's is 0)")
    finetune.add_argument("--no-activation-checkpointing", action="store_true",
                          help="keep every layer's activations while training: faster, much more memory")
    finetune.add_argument("--save-every", type=int, default=25, help="optimizer steps between resumable states")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--teacher", default=None, help="kd teacher (default: the source model in mop.json)")
    finetune.add_argument("--kd-data", default="c4", help="kd raw text: c4, wikitext2, alpaca or a file")
    finetune.add_argument("--kd-temperature", type=float, default=1.0)
    finetune.set_defaults(handler=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from mop.training import FinetuneConfig, finetune
    from mop.training.recovery import recovery_lora

    given = {name: value for name, value in (("rank", args.rank), ("alpha", args.alpha)) if value is not None}
    lora = recovery_lora(args.model, dropout=args.dropout, learning_rate=args.lr, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, max_length=args.max_length,
                         activation_checkpointing=not args.no_activation_checkpointing, **given)
    config = FinetuneConfig(data=args.data, epochs=args.epochs, max_steps=args.max_steps, lora=lora, seed=args.seed,
                            save_every=args.save_every, method=args.method, teacher=args.teacher,
                            kd_data=args.kd_data, kd_temperature=args.kd_temperature, trainable=args.trainable)
    config.validate()  # before the model loads
    _check_training_data(config)
    record = finetune(args.model, args.out, config, args.device, args.dtype)
    if PartialState().is_main_process:
        losses = record["losses"]
        print(f"{args.out}: {record['steps']} {record['method']} steps on {record['data']['source']}, "
              f"{record['processes']} process(es), loss {losses[0]:.4f} -> {losses[-1]:.4f}, {record['seconds']:.0f} s")


def register_eval(commands) -> None:
    from mop.evaluation import TASKS
    from mop.evaluation.multimodal import MULTIMODAL_TASKS

    evaluate = commands.add_parser("eval", help="zero-shot accuracy (lm-eval, offline) and WikiText-2 perplexity")
    _add_model_options(evaluate)
    evaluate.add_argument("--tasks", required=True, help=f"comma-separated, from: {', '.join(TASKS)}; a vision-language "
                                                         f"model also: {', '.join(MULTIMODAL_TASKS)}")
    evaluate.add_argument("--output", type=Path, required=True, help="JSON file for the full record")
    evaluate.add_argument("--limit", type=int, help="documents per task, and wikitext segments (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--ppl-segment-length", type=int, default=2048, help="tokens per wikitext segment")
    evaluate.add_argument("--ppl-segments", type=int, default=None, help="wikitext segments (default: --limit, or all)")
    evaluate.add_argument("--task-file", type=_task_file, action="append", default=[], metavar="TASK=PATH",
                          help="read TASK's documents from PATH (default: MOP_DATA_DIR, then the hub); repeatable")
    evaluate.set_defaults(handler=cmd_eval)


def _task_file(spec: str) -> tuple[str, Path]:
    task, separator, path = spec.partition("=")
    if not (separator and task and path):
        raise argparse.ArgumentTypeError(f"expected TASK=PATH, not {spec!r}")
    return task, Path(path)


def cmd_eval(args: argparse.Namespace) -> None:
    from mop.evaluation import evaluate, multimodal, summary_table, validate_settings, validate_tasks
    from mop.models import load_model

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    images = [name for name in tasks if name in multimodal.MULTIMODAL_TASKS]  # image + text tasks of a VLM
    tasks = [name for name in tasks if name not in images]
    task_files = dict(args.task_file)
    if tasks or not images:
        validate_tasks(tasks, task_files)  # before the model loads
    multimodal.validate_multimodal_tasks(images)
    validate_settings(args.limit, args.batch_size, args.ppl_segment_length, args.ppl_segments)
    loaded = load_model(args.model, args.device, args.dtype)
    record = evaluate(loaded, tasks, args.limit, args.batch_size, args.ppl_segment_length, task_files,
                      args.ppl_segments) if tasks else {}
    tables = [summary_table(record)] if tasks else []
    if images:
        record["multimodal"] = multimodal.evaluate_multimodal(loaded, images, args.limit)
        tables.append(multimodal.summary_table(record["multimodal"]))
    _write_record(args.output, record, *tables)
    if tasks:
        _add_to_card(loaded, evaluation=record)


def _write_record(output: Path, record: dict, *tables: Table) -> None:
    """The command's record into `output` (atomically), its tables to the terminal."""
    from mop.provenance import write_json_atomic

    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, record)
    for table in tables:
        Console().print(table)


def _add_to_card(loaded, **records: dict) -> None:
    """Add what was measured to the model card of a checkpoint mop wrote (`mop.modelcard.add_results`)."""
    from mop.modelcard import add_results

    try:
        add_results(loaded.directory, loaded.weights_sha256, **records)
    except OSError as error:  # a read-only checkpoint: the record is written, the card stays as it was
        log.warning("the model card of %s is not updated: %s", loaded.directory, error)


def register_check(commands) -> None:
    check = commands.add_parser("check", help="serve checkpoints in vLLM and compare its greedy decoding with "
                                              "transformers' in float32 (needs a vLLM environment)")
    check.add_argument("models", nargs="+", type=Path, help="checkpoint directories")
    check.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per prompt")
    check.add_argument("--top-logprobs", type=int, default=5, help="vLLM's top tokens compared at each step")
    check.add_argument("--atol", type=float, default=1e-3, help="largest log-probability difference allowed")
    check.add_argument("--json", type=Path, help="write every result here")
    check.set_defaults(handler=cmd_check)


def cmd_check(args: argparse.Namespace) -> None:
    """`mop check`: the vLLM serving check of `mop.serving.vllm_check` on a user's checkpoints."""
    import json
    from dataclasses import asdict

    from mop.serving.vllm_check import check, find_vllm_python, summary

    for model in args.models:
        if not (model / "config.json").is_file():
            raise MopError(f"{model} is not a checkpoint directory: it has no config.json")
    python, why = find_vllm_python()
    if python is None:
        raise MopError(f"vLLM not found: {why}")
    results = check(args.models, max_new_tokens=args.max_new_tokens, top_logprobs=args.top_logprobs,
                    atol=args.atol, python=python)
    for result in results:
        print(summary(result))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    failed = [r.model for r in results if not r.ok]
    if failed:
        raise MopError(f"{len(failed)} of {len(results)} checkpoints do not decode as in transformers: {', '.join(failed)}")


def register_bench(commands) -> None:
    bench = commands.add_parser("bench", help="time generation against the dense model (the paper's latency protocol)")
    _add_model_options(bench)
    bench.add_argument("--baseline", help="model timed against MODEL in the same run (default: the source model "
                                          "named in MODEL/mop.json; none for a model mop did not write)")
    bench.add_argument("--output", type=Path, required=True, help="JSON file for the full record")
    bench.add_argument("--runs", type=int, default=20, help="runs per model, the models alternating")
    bench.add_argument("--warmup", type=int, default=10, help="first runs of each model left out of the statistics")
    bench.add_argument("--prompt-tokens", type=int, default=12)
    bench.add_argument("--new-tokens", type=int, default=128, help="exactly this many greedy tokens (EOS ignored)")
    bench.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill throughput")
    bench.add_argument("--no-generate", action="store_true",
                       help="do not also time model.generate every run (halves the time; the speedup is unchanged)")
    bench.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                       help="time in transformers (here) or in vLLM (its own environment, see mop check)")
    bench.add_argument("--batch", type=int, default=16, help="vLLM: concurrent requests of the throughput measurement")
    bench.add_argument("--batch-runs", type=int, default=4, help="vLLM: throughput runs per model (the first discarded)")
    bench.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    from mop.latency import LatencySettings, benchmark, source_baseline, summary_table
    from mop.models import load_model

    settings = LatencySettings(runs=args.runs, warmup=args.warmup, prompt_tokens=args.prompt_tokens,
                               new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
                               time_generate=not args.no_generate)
    settings.validate()  # before the models load
    if args.engine == "vllm":
        return _bench_vllm(args, settings)
    candidate = load_model(args.model, args.device, args.dtype)
    if args.baseline:
        baseline = load_model(args.baseline, args.device, args.dtype)
    else:
        baseline = source_baseline(candidate, args.device, args.dtype)
    record = benchmark(candidate, baseline, settings)
    _write_record(args.output, record, summary_table(record))
    _add_to_card(candidate, latency=record)


def _bench_vllm(args: argparse.Namespace, latency) -> None:
    from mop.latency import source_of
    from mop.models.loading import resolve_model_dir
    from mop.latency.vllm_bench import VllmBenchSettings, benchmark_vllm, summary_table
    from mop.modelcard import record_measured_speedup

    settings = VllmBenchSettings(latency, batch=args.batch, batch_runs=args.batch_runs, dtype=args.dtype)
    baseline = args.baseline or (source_of(resolve_model_dir(args.model)) or {}).get("name")
    record = benchmark_vllm(args.model, baseline, settings)
    _write_record(args.output, record, summary_table(record))
    if Path(args.model).is_dir():
        record_measured_speedup(Path(args.model), record)


def register_run(commands) -> None:
    run = commands.add_parser("run", help="prune, recover, evaluate and time every target and seed; write a report")
    _add_pipeline_options(run)
    run.set_defaults(handler=cmd_run)


def register_compare(commands) -> None:
    compare = commands.add_parser("compare", help="several pruning methods through the same recovery, evaluation "
                                                  "and timing; one report")
    compare.add_argument("--methods", required=True,
                         help="comma-separated presets (mop, depth, width, mop-kl, mop-cosine, mop-ppl, mop-bi, "
                              "shortgpt, llm-pruner), or one LABEL:field=value,... (repeat --methods for several)",
                         action="append")
    _add_pipeline_options(compare)
    compare.set_defaults(handler=cmd_compare)


def _add_pipeline_options(run: argparse.ArgumentParser) -> None:
    """The options of `mop run` and `mop compare`: model, search, recovery, evaluation, latency."""
    _add_model_options(run)
    run.add_argument("--out", type=Path, required=True, help="run directory (finished stages are not redone)")
    run.add_argument("--seeds", type=_seed_list, default=[0], help="comma-separated, e.g. 0,1,2 (default 0)")
    _add_search_options(run)
    recovery = run.add_argument_group("recovery fine-tuning (mop finetune)")
    recovery.add_argument("--no-recovery", action="store_true", help="evaluate the pruned checkpoints as they are")
    recovery.add_argument("--recovery-method", default="sft", choices=["sft", "kd"])
    recovery.add_argument("--recovery-trainable", default="lora", choices=TRAINABLE, help=TRAINABLE_HELP)
    recovery.add_argument("--recovery-data", default="alpaca")
    recovery.add_argument("--recovery-epochs", type=float, default=2.0)
    recovery.add_argument("--recovery-steps", type=int, default=None, help="optimizer steps (overrides the epochs)")
    recovery.add_argument("--recovery-batch-size", type=int, default=16)
    recovery.add_argument("--recovery-micro-batch-size", type=int, default=4)
    recovery.add_argument("--recovery-max-length", type=int, default=512)
    recovery.add_argument("--recovery-lr", type=float, default=3e-4,
                          help="AdamW learning rate (the paper's LoRA 3e-4)")
    recovery.add_argument("--recovery-dropout", type=float, default=0.05, help="LoRA dropout (the paper's 0.05)")
    recovery.add_argument("--recovery-weight-decay", type=float, default=0.01,
                          help="AdamW weight decay (torch's default 0.01; the reference recipe's is 0)")
    evaluation = run.add_argument_group("evaluation (mop eval)")
    evaluation.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,piqa,winogrande,wikitext")
    evaluation.add_argument("--eval-limit", type=int, default=None, help="documents per task (default: all)")
    evaluation.add_argument("--eval-batch-size", type=int, default=8)
    evaluation.add_argument("--eval-ppl-segment-length", type=int, default=2048)
    evaluation.add_argument("--eval-ppl-segments", type=int, default=None,
                            help="wikitext segments (default: --eval-limit, or all)")
    latency = run.add_argument_group("latency (mop bench)")
    latency.add_argument("--no-bench", action="store_true", help="do not time the checkpoints")
    latency.add_argument("--bench-runs", type=int, default=20)
    latency.add_argument("--bench-warmup", type=int, default=10)
    latency.add_argument("--bench-no-generate", action="store_true",
                         help="do not also time model.generate (halves the timing; the speedup is unchanged)")
    latency.add_argument("--bench-vllm", action="store_true",
                         help="time every checkpoint in vLLM too (batch 1 and throughput; needs vLLM, see mop check)")
    latency.add_argument("--bench-batch", type=int, default=16, help="vLLM throughput: concurrent requests")


def _seed_list(spec: str) -> list[int]:
    try:
        return [rng_seed(text) for text in spec.split(",") if text.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers in [0, 2**32), not {spec!r}") from None


def cmd_run(args: argparse.Namespace) -> None:
    from mop.pipeline import run_pipeline
    from mop.report import results_table

    results = run_pipeline(args.model, _pipeline_config(args), args.out)
    _print_results(results_table(results, f"mop run: {args.model}"), args.out)


def cmd_compare(args: argparse.Namespace) -> None:
    from mop.compare import parse_method, run_compare
    from mop.report import results_table

    specs = [spec for given in args.methods for spec in (given.split(",") if ":" not in given else [given])]
    methods = dict(parse_method(spec.strip()) for spec in specs if spec.strip())
    results = run_compare(args.model, _pipeline_config(args), methods, args.out)
    _print_results(results_table(results, f"mop compare: {args.model}"), args.out)


def _print_results(table: Table, out: Path) -> None:
    """The report's results table, then where the report is."""
    console = Console()
    console.print(table)
    console.print(f"report: {out / 'report.md'}")


def _pipeline_config(args: argparse.Namespace):
    from mop.latency import LatencySettings
    from mop.models.loading import resolve_model_dir
    from mop.pipeline import PipelineConfig
    from mop.latency.vllm_bench import VllmBenchSettings
    from mop.training import FinetuneConfig
    from mop.training.recovery import recovery_lora

    recovery = None if args.no_recovery else FinetuneConfig(
        data=args.recovery_data, epochs=args.recovery_epochs, max_steps=args.recovery_steps,
        method=args.recovery_method, trainable=args.recovery_trainable, lora=recovery_lora(args.model, batch_size=args.recovery_batch_size,
                                                        micro_batch_size=args.recovery_micro_batch_size,
                                                        max_length=args.recovery_max_length,
                                                        learning_rate=args.recovery_lr,
                                                        dropout=args.recovery_dropout,
                                                        weight_decay=args.recovery_weight_decay,
                                                        activation_checkpointing=not args.no_activation_checkpointing))
    config = PipelineConfig(
        search=_search_config(args, args.seeds[0] if args.seeds else 0), seeds=args.seeds, recovery=recovery,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], eval_limit=args.eval_limit,
        eval_batch_size=args.eval_batch_size, ppl_segment_length=args.eval_ppl_segment_length,
        ppl_segments=args.eval_ppl_segments,
        latency=None if args.no_bench else LatencySettings(runs=args.bench_runs, warmup=args.bench_warmup,
                                                           time_generate=not args.bench_no_generate),
        vllm_latency=VllmBenchSettings(LatencySettings(runs=args.bench_runs, warmup=args.bench_warmup),
                                       batch=args.bench_batch, dtype=args.dtype) if args.bench_vllm else None,
        device=args.device, dtype=args.dtype)
    config.validate()
    if recovery is not None:
        _check_training_data(recovery)
    resolve_model_dir(args.model)  # a mistyped model fails before OUT is claimed
    return config


def print_summary(state) -> None:
    table = Table(title=f"{state.identity.get('method', 'mop')} path {''.join(r['choice'] for r in state.iterations)}")
    for column in ("iteration", "choice", "decided by", "layer", "parameters", "compression", "seconds"):
        table.add_column(column, justify="right")
    for r in state.iterations:
        table.add_row(str(r["iteration"]), r["choice"], r["decided_by"], str(r["layer"]) if r["choice"] == "D" else "",
                      f"{r['params']:,}", f"{r['compression']:.2%}",
                      f"{r['seconds']:.1f}" if "seconds" in r else "")  # ShortGPT cuts its layers at the end
    console = Console()
    console.print(table)
    for name, reached in sorted(state.targets.items()):
        whole = reached.get("whole_model")  # a VLM: the language model's numbers, then the whole model's
        beside = (f"; whole model {whole['params']:,} parameters, {whole['compression']:.2%} compression"
                  if whole and whole["params"] != reached["params"] else "")
        speed = f", {reached['predicted_speedup']:.3f}× predicted speedup" if "predicted_speedup" in reached else ""
        console.print(f"{state.directory / name}: {reached['params']:,} parameters, "
                      f"{reached['compression']:.2%} compression{speed} (iteration {reached['iteration']}){beside}")


def _check_output_places(args: argparse.Namespace) -> None:
    """Refuse an output that cannot be made: any under an existing file, a directory (--out) that is a file, a
    JSON file (--output, --json) that is a directory."""
    for option in ("out", "output", "json"):
        if (path := getattr(args, option, None)) is None:
            continue
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir():
            raise MopError(f"--{option} {path} cannot be written: {parent} is a file, not a directory")
        if option == "out" and path.exists() and not path.is_dir():
            raise MopError(f"--out {path} is a file; give a directory")
        if option != "out" and path.is_dir():
            raise MopError(f"--{option} {path} is a directory; give a JSON file name")


def log_file(args: argparse.Namespace) -> Path | None:
    """Where the command's log goes: beside `--output` (F.json → F.log) for eval and bench; OUT/mop.log for prune,
    finetune and run, or OUT.log beside it while OUT is not a directory with something in it (a log alone in OUT
    would make a rerun find OUT in use)."""
    if (output := getattr(args, "output", None)) is not None:
        return output.with_name(output.name + ".log" if output.suffix == ".log" else output.stem + ".log")
    if (out := getattr(args, "out", None)) is not None:
        return out / "mop.log" if out.is_dir() and any(out.iterdir()) else out.with_name(out.name + ".log")
    return None


def _early_options(argv: list[str]) -> argparse.Namespace:
    """-v and --plugin, wherever they are in `argv`: they decide the logging and the choices of the full parser."""
    early = Parser(prog="mop", add_help=False)
    _add_common_options(early)
    return early.parse_known_args(argv)[0]


def _unexpected(error: BaseException, path: Path, verbose: bool) -> int:
    """One line for an error that is not the user's (its traceback is in the log at `path`); the exit status."""
    if verbose:
        traceback.print_exc()
    if isinstance(error, KeyboardInterrupt):
        print(f"mop: interrupted (log: {path})", file=sys.stderr)
        return 130
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    print(f"mop: error: {message} (unexpected; the traceback is in {path})", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status: 0 done, 2 a user error, 1 an unexpected error, 130 interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        early = _early_options(argv)
    except MopError as error:
        print(f"mop: error: {error}", file=sys.stderr)
        return 2
    args = None
    with logs.routed(early.verbose) as records:
        try:
            if plugins := load_plugins(early.plugin):
                log.info("plugins: %s", ", ".join(plugins))
            args = build_parser(recipes.chosen(argv)).parse_args(argv)
            _check_output_places(args)
            with invoked_as(argv):
                args.handler(args)
        except MopError as error:  # the output is left as it was: no log file either
            print(f"mop: error: {error}", file=sys.stderr)
            return 2
        except (Exception, KeyboardInterrupt) as error:
            path = (args is not None and log_file(args)) or Path(tempfile.gettempdir()) / f"mop-{os.getpid()}.log"
            records.write(path, argv, traceback.format_exc())
            return _unexpected(error, path, early.verbose)
        if (path := log_file(args)) is not None:
            records.write(path, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
