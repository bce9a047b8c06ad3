"""Atomic file writes: a destination holds either its old content or the complete new one, never half."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from safetensors.torch import save_file


def fsync_dir(directory: str) -> None:
    """Persist a rename in ``directory`` (not possible, nor needed, on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_destination(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; once the caller has written it, fsync and rename it over.

    The temporary file is in the same folder (so ``os.replace`` is an atomic rename on one filesystem).
    On any error, KeyboardInterrupt included, it is removed and ``path`` is untouched. The result gets
    the permissions of the file it replaces, or those a plain ``open()`` would give (mkstemp's are 0600).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp_path
        mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o644
        os.chmod(tmp_path, mode)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    fsync_dir(directory)


def write_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None
) -> None:
    """Write a safetensors file so that ``path`` is either the old file or the complete new one.

    The data goes to a temporary file in the same directory (so ``os.replace`` is an atomic rename on
    one filesystem), is fsync'ed, then renamed over ``path``. On any error the temporary file is
    removed and ``path`` is untouched.

    Args:
        tensors: Tensors to store (moved to CPU, made contiguous).
        path: Destination file.
        metadata: safetensors string metadata, or None.
    """
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_destination(path) as tmp_path:
        save_file(data, tmp_path, metadata=dict(metadata) if metadata is not None else None)
