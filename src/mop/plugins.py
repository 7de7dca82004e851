"""Plugins: modules that register criteria (`mop.pruning.criteria.layer_criterion`, `width_criterion`,
`path_criterion`) or pruning methods (`mop.pruning.methods.pruning_method`) when they are imported.

The command line imports every entry point of the group `mop.plugins` of the installed packages, then every
module named with `--plugin`, before it builds its options, so the names they register are valid choices. A
package declares its plugin in its `pyproject.toml`:

    [project.entry-points."mop.plugins"]
    my_criteria = "my_package.criteria"
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from functools import partial

from mop.errors import MopError

ENTRY_POINT_GROUP = "mop.plugins"


def load_plugins(modules: list[str]) -> list[str]:
    """Import the installed `mop.plugins` entry points, then `modules`; their names, in import order. A plugin
    that fails to import is an error, named with the package that declares it."""
    loaded = []
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        package = entry_point.dist.name if entry_point.dist is not None else "an installed package"
        _import(entry_point.load, f"plugin {entry_point.value} (entry point {entry_point.name} of {package})")
        loaded.append(entry_point.value)
    for module in modules:
        _import(partial(importlib.import_module, module), f"--plugin {module}")
        loaded.append(module)
    return loaded


def _import(load: Callable[[], object], what: str) -> None:
    try:
        load()
    except MopError:
        raise
    except Exception as error:  # a missing module, or any error the module raises as it is imported
        message = str(error).splitlines()[0] if str(error) else ""
        raise MopError(f"{what} cannot be imported: {type(error).__name__}: {message}") from None
