"""Recipes: named defaults for `mop prune`, `mop run` and `mop compare`. An option given on the command line
always wins over its recipe's value; a recipe sets nothing that is not an option, so a run made with a recipe
is the run of the options it stands for (its identity, its `mop.json`).

- `paper`: the paper's settings, which are the defaults of every command (third-to-last layer, AMP on Alpaca
  prompts, random path, no compensation; SFT recovery on Alpaca at LoRA rate 3e-4).
- `small`: the study's configuration for small models (docs/RESULTS.md, "Recommended configuration for small
  models"): layers chosen by block influence, every cut repaired in closed form from WikiText-2 validation
  text, and, where a recovery runs, distillation from the dense model on C4 at LoRA rate 2e-3.
"""

from __future__ import annotations

import argparse

RECIPES: dict[str, dict[str, object]] = {
    "paper": {},
    "small": {"layer_criterion": "block_influence", "compensation": "lstsq", "calib": "wikitext2-valid",
              "recovery_method": "kd", "recovery_lr": 2e-3},
}


def add_recipe_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                        help="named defaults: paper (the paper's settings) or small (the study's for small models); "
                             "options given on the command line win")


def chosen(argv: list[str]) -> str:
    """The recipe `argv` names (the last --recipe), `paper` when none; an unknown name is left to the parser."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--recipe", default="paper")
    return early.parse_known_args(argv)[0].recipe


def apply(parser: argparse.ArgumentParser, recipe: str) -> None:
    """Make `recipe`'s values the defaults of every subcommand of `parser` that has those options."""
    values = RECIPES.get(recipe, {})
    for action in parser._subparsers._group_actions:  # the subcommands
        for command in action.choices.values():
            known = {a.dest for a in command._actions}
            command.set_defaults(**{k: v for k, v in values.items() if k in known})
