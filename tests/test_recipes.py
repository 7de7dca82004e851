"""Recipes: `paper` is the commands' defaults; `small` sets the study's configuration for small models, and an
option given on the command line wins over its recipe."""

import pytest

from mop.cli import build_parser
from mop.recipes import RECIPES, chosen


def parse(argv: list[str]):
    return build_parser(chosen(argv)).parse_args(argv)


@pytest.mark.parametrize("command", ["prune", "run", "compare"])
def test_paper_recipe_is_the_defaults(command):
    extra = ["--methods", "mop"] if command == "compare" else []
    plain = vars(parse([command, "m", "--target", "0.2", "--out", "o", *extra]))
    paper = vars(parse([command, "m", "--target", "0.2", "--out", "o", "--recipe", "paper", *extra]))
    assert plain == paper
    assert (paper["layer_criterion"], paper["compensation"], paper["calib"]) == ("third_to_last", "none", "alpaca")


def test_small_recipe_sets_the_study_configuration_and_the_command_line_wins():
    args = parse(["run", "m", "--target", "0.2", "--out", "o", "--recipe", "small"])
    assert (args.layer_criterion, args.compensation, args.calib) == ("block_influence", "lstsq", "wikitext2-valid")
    assert (args.recovery_method, args.recovery_lr) == ("kd", 2e-3)
    pruned = parse(["prune", "m", "--target", "0.2", "--out", "o", "--recipe", "small", "--calib", "c4"])
    assert pruned.calib == "c4" and pruned.compensation == "lstsq"  # the explicit option wins
    assert set(RECIPES["small"]) <= set(vars(args))  # every value of a recipe is an option


def test_unknown_recipe_is_one_line(capsys):
    from mop.cli import main

    assert main(["prune", "m", "--target", "0.2", "--out", "o", "--recipe", "tiny"]) == 2
    assert "invalid choice: 'tiny'" in capsys.readouterr().err
