"""Provenance: what a record says about how it was made — library versions, the digest of a model's weights —
and how records are read and written (atomically, so a kill never leaves half a file)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shlex
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

PACKAGES = ("mixture-of-pruners", "torch", "transformers", "peft", "accelerate")
_command: str | None = None  # the running `mop` command line (`invoked_as`); None under the Python API


@contextmanager
def invoked_as(argv: list[str]) -> Iterator[None]:
    """While a `mop` command runs: its command line, `mop ARGV` as a shell would read it, for `command`."""
    global _command
    _command = shlex.join(["mop", *argv])
    try:
        yield
    finally:
        _command = None


def command() -> str | None:
    """The command line of the running `mop` command, recorded in what it writes; None for a Python API call."""
    return _command


def versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """Installed versions of our package and the libraries that decide its numbers (None: not installed)."""
    found = {}
    for name in (*PACKAGES, *extra):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


class WeightsDigest:
    """sha256 over named tensors in name order (name, dtype, shape, raw bytes): the one definition of "the
    weights' hash" in mop. It depends on tensor contents only, not on file layout, sharding or metadata, so
    re-saving the same weights gives the same digest; equal digests mean bitwise-equal weights."""

    def __init__(self) -> None:
        self._tensors: dict[str, bytes] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        self._tensors[name] = digest.digest()

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for name in sorted(self._tensors):
            total.update(self._tensors[name])
        return total.hexdigest()


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The digest of named tensors (a state dict, or a model's `named_parameters()`)."""
    digest = WeightsDigest()
    for name, tensor in tensors.items():
        digest.add(name, tensor)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write `payload` to `path` through a fsynced `.partial` sibling and a rename."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1))
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    partial.replace(path)


def read_provenance(directory: Path) -> dict:
    """The checkpoint's mop.json, or {} for a model that mop did not write."""
    path = directory / "mop.json"
    return json.loads(path.read_text()) if path.is_file() else {}
