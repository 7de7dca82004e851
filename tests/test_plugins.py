"""Plugins: a criterion or pruning method registered by a module outside the package can be named on the command
line, whether the module is given with --plugin or installed as a `mop.plugins` entry point."""

import importlib
import json
import sys
import textwrap

import pytest

from mop.cli import main
from mop.pruning.criteria import LAYER_CRITERIA, PATH_CRITERIA, WIDTH_CRITERIA
from mop.pruning.methods import PRUNING_METHODS

SMALL = ["--calib-samples", "4", "--calib-max-length", "32"]

SECOND_LAYER = textwrap.dedent('''
    from mop.pruning.criteria import layer_criterion

    @layer_criterion("second_layer")
    def second_layer(model, adapter, batches):
        return 1
''')
DEPTH_ONLY = textwrap.dedent('''
    import dataclasses

    from mop.pruning.methods import PRUNING_METHODS, pruning_method

    @pruning_method("depth_only")
    def depth_only(loaded, config, out):
        return PRUNING_METHODS["mop"](loaded, dataclasses.replace(config, mode="depth"), out)
''')


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A directory on sys.path for plugin modules; registries and imported modules restored afterwards."""
    registries = [LAYER_CRITERIA, WIDTH_CRITERIA, PATH_CRITERIA, PRUNING_METHODS]
    saved = [dict(registry) for registry in registries]
    directory = tmp_path / "plugins"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    yield directory
    for registry, contents in zip(registries, saved):
        registry.clear()
        registry.update(contents)
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(directory)):
            del sys.modules[name]


def chosen_layers(out) -> list[int]:
    iterations = json.loads((out / "run.json").read_text())["iterations"]
    return [iteration["layer"] for iteration in iterations]


def test_layer_criterion_from_a_plugin_module(plugin_dir, tiny_dirs, tmp_path, capsys):
    (plugin_dir / "my_criteria.py").write_text(SECOND_LAYER)
    model, out = str(tiny_dirs["llama-gqa"]), tmp_path / "out"
    prune = ["prune", model, "--target", "0.2", "--mode", "depth", "--out", str(out), *SMALL]

    assert main([*prune, "--layer-criterion", "second_layer"]) == 2  # unknown without the plugin
    assert "invalid choice: 'second_layer'" in capsys.readouterr().err and not out.exists()

    assert main([*prune, "--layer-criterion", "second_layer", "--plugin", "my_criteria"]) == 0
    assert chosen_layers(out) == [1, 1]  # the plugin's choice, not the default third-to-last (3, then 2)
    assert json.loads((out / "run.json").read_text())["identity"]["layer_criterion"] == "second_layer"


def test_pruning_method_from_an_installed_entry_point(plugin_dir, tiny_dirs, tmp_path, capsys):
    """A distribution on sys.path whose entry_points.txt declares the module in the group mop.plugins."""
    (plugin_dir / "mop_depth_only.py").write_text(DEPTH_ONLY)
    model, out = str(tiny_dirs["llama-gqa"]), tmp_path / "out"
    prune = ["prune", model, "--target", "0.2", "--method", "depth_only", "--seed", "4", "--out", str(out), *SMALL]
    assert main(prune) == 2
    assert "unknown pruning method depth_only" in capsys.readouterr().err and not out.exists()

    info = plugin_dir / "mop_depth_only-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mop-depth-only\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mop.plugins]\ndepth_only = mop_depth_only\n")
    importlib.invalidate_caches()
    assert main(prune) == 0
    path = json.loads((out / "run.json").read_text())["iterations"]
    assert [iteration["choice"] for iteration in path] == ["D", "D"]  # seed 4's coin says W, W, ...


def test_a_broken_plugin_is_one_line(plugin_dir, tiny_dirs, tmp_path, capsys):
    (plugin_dir / "broken_plugin.py").write_text("raise ValueError('no such criterion here')\n")
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dirs["llama-gqa"]), "--target", "0.2", "--out", str(out),
                 "--plugin", "broken_plugin"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mop: error: --plugin broken_plugin cannot be imported: ValueError: no such criterion here"]
    assert not out.exists()
