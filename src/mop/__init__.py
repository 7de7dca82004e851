"""mixture-of-pruners: structured pruning of LLaMA-family models with MoP (depth + width)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixture-of-pruners")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from mop.errors import MopError  # noqa: E402

__all__ = ["MopError", "__version__"]
