"""Test-wide settings: never reach the Hugging Face hub (no network here; everything is built locally)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import contextlib  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@contextlib.contextmanager
def offline_tiny_env(root) -> Iterator[dict[str, str]]:
    """Offline, one torch thread, a tiny-model cache under ``root`` shared by a module's runs and
    generations; yields the environment for subprocesses. (One thread: on a busy shared CPU two spinning
    OpenMP threads make the tiny models' first forward passes ~50x slower.)"""
    values = {"PERFLOW_VIDEO_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in values.items():
                mp.setenv(key, value)
            yield {**os.environ, **values}
    finally:
        torch.set_num_threads(threads)


def user_error(capsys, *needles: str) -> str:
    """The one ``error: ...`` line a CLI printed on stderr (no traceback), containing every needle."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
