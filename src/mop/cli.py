"""The `mop` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mop.criteria import LAYER_CRITERIA, PATH_CRITERIA, WIDTH_CRITERIA
from mop.errors import MopError
from mop.search import MODES, SearchConfig


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a checkpoint directory, a hub id, or smollm2-135m")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (spread over GPUs and CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mop", description="Structured pruning of LLaMA-family models with MoP.")
    commands = parser.add_subparsers(dest="command", required=True)
    for register in (register_prune,):
        register(commands)
    return parser


def register_prune(commands) -> None:
    prune = commands.add_parser("prune", help="search a depth/width pruning path and write a checkpoint per target")
    _add_model_options(prune)
    prune.add_argument("--target", type=float, action="append", required=True,
                       help="compression ratio in (0, 1); repeat for several checkpoints from one search")
    prune.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds this run)")
    prune.add_argument("--mode", default="mop", choices=MODES)
    prune.add_argument("--path-criterion", default="random", choices=sorted(PATH_CRITERIA))
    prune.add_argument("--layer-criterion", default="third_to_last", choices=sorted(LAYER_CRITERIA))
    prune.add_argument("--width-criterion", default="amp", choices=sorted(WIDTH_CRITERIA))
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--calib", default="alpaca", help="AMP calibration data: alpaca, wikitext2, c4 or a file")
    prune.add_argument("--calib-samples", type=int, default=128)
    prune.add_argument("--calib-max-length", type=int, default=512)
    prune.add_argument("--batch-size", type=int, default=8, help="prompts per scoring forward pass")
    prune.add_argument("--path-data", default="wikitext2", help="data for the cosine/kl/ppl path criteria")
    prune.add_argument("--path-samples", type=int, default=128, help="texts for cosine and kl")
    prune.add_argument("--path-max-length", type=int, default=512, help="tokens per text for cosine and kl")
    prune.add_argument("--ppl-segment-length", type=int, default=2048)
    prune.add_argument("--ppl-segments", type=int, default=None, help="limit the perplexity segments (default: all)")
    prune.add_argument("--tune-data", default="alpaca", help="Alpaca-format data for the candidates' short tuning")
    prune.add_argument("--tune-steps", type=int, default=10, help="iteration t tunes each candidate for this × t steps")
    prune.add_argument("--tune-batch-size", type=int, default=16)
    prune.add_argument("--tune-micro-batch-size", type=int, default=4)
    prune.add_argument("--tune-max-length", type=int, default=512)
    prune.set_defaults(handler=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> None:
    from mop.models import load_model
    from mop.search import Search
    from mop.tuning import LoraSettings

    config = SearchConfig(
        targets=args.target, mode=args.mode, layer_criterion=args.layer_criterion,
        width_criterion=args.width_criterion, path_criterion=args.path_criterion, seed=args.seed, calib=args.calib,
        calib_samples=args.calib_samples, calib_max_length=args.calib_max_length, batch_size=args.batch_size,
        path_data=args.path_data, path_samples=args.path_samples, path_max_length=args.path_max_length,
        ppl_segment_length=args.ppl_segment_length, ppl_segments=args.ppl_segments, tune_data=args.tune_data,
        tune_steps_per_iteration=args.tune_steps,
        lora=LoraSettings(batch_size=args.tune_batch_size, micro_batch_size=args.tune_micro_batch_size,
                          max_length=args.tune_max_length),
    )
    config.validate()  # before the model loads: bad options fail fast
    loaded = load_model(args.model, args.device, args.dtype)
    state = Search(loaded, config, args.out).run()
    print_summary(state)


def print_summary(state) -> None:
    table = Table(title=f"MoP path {''.join(r['choice'] for r in state.iterations)}")
    for column in ("iteration", "choice", "decided by", "layer", "parameters", "compression", "seconds"):
        table.add_column(column, justify="right")
    for r in state.iterations:
        table.add_row(str(r["iteration"]), r["choice"], r["decided_by"], str(r["layer"]) if r["choice"] == "D" else "",
                      f"{r['params']:,}", f"{r['compression']:.2%}", f"{r['seconds']:.1f}")
    console = Console()
    console.print(table)
    for name, reached in sorted(state.targets.items()):
        console.print(f"{state.directory / name}: {reached['params']:,} parameters, "
                      f"{reached['compression']:.2%} compression (iteration {reached['iteration']})")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except MopError as error:
        print(f"mop: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
