"""Honest clocks and memory gauges for the benchmarks (``scripts/benchmark_generate.py``, ``benchmark_gpu.py``).

* Time: ``time.perf_counter`` around the work, with ``torch.cuda.synchronize`` before reading the clock on
  a CUDA device (kernels are asynchronous: without it a timer measures the launch, not the work).
* Components of a diffusers pipeline: :class:`ComponentTimers` puts timers around the forward calls of the
  text encoder and the UNet (module hooks) and around ``vae.decode`` (an instance attribute that shadows
  the method, removed again afterwards), and counts UNet evaluations (the rows of each sample batch: a CFG
  batch of two counts 2).
* Memory: on CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on a Linux CPU,
  the kernel's resident-set high-water mark ``VmHWM`` of ``/proc/self/status``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` (exact, and it sees every allocator, torch's included, which tracemalloc does
  not). Elsewhere ``getrusage`` max RSS, which cannot be reset (``method`` says which was used).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_STATUS, _CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"
MIB = 2**20


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device | str) -> Iterator[list[float]]:
    """``with stopwatch(dev) as t: ...`` then ``t[0]`` is the seconds the block took, device work included."""
    elapsed = [0.0]
    synchronize(device)
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        synchronize(device)
        elapsed[0] = time.perf_counter() - start


def _status_kib(key: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_high_water() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """The peak memory of one measured block. ``peak_mib``: the high-water mark during the block (absolute);
    ``delta_mib``: that minus what was in use when it started; ``method``: how it was measured."""

    peak_mib: float
    delta_mib: float
    method: str


class MemoryGauge:
    """Measures the peak memory of a block on ``device``: ``with gauge.measure() as out: ...; out[0]``."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    @contextmanager
    def measure(self) -> Iterator[list[PeakMemory]]:
        result: list[PeakMemory] = []
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            try:
                yield result
            finally:
                synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                result.append(PeakMemory(peak / MIB, (peak - start) / MIB, "cuda max_memory_allocated"))
            return
        resettable = _reset_rss_high_water() and _status_kib("VmHWM") is not None
        start_kib = _status_kib("VmRSS") if resettable else _maxrss_kib()
        try:
            yield result
        finally:
            peak_kib = _status_kib("VmHWM") if resettable else _maxrss_kib()
            method = "VmHWM (reset via clear_refs)" if resettable else "getrusage max RSS (process lifetime)"
            result.append(PeakMemory(peak_kib / 1024, (peak_kib - start_kib) / 1024, method))


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


@dataclass
class ComponentTime:
    """Seconds spent in one component's calls, and how many calls (UNet: evaluations, i.e. sample rows)."""

    seconds: float = 0.0
    calls: int = 0


@dataclass
class ComponentTimers:
    """Timers around a pipeline's text encoder, UNet and VAE decode; :meth:`attach` installs them.

    ``unet.calls`` counts UNet evaluations: the batch rows of every forward's sample (a CFG batch counts 2),
    so DDIM 25 steps with CFG counts 50.
    """

    device: torch.device
    text: ComponentTime = field(default_factory=ComponentTime)
    unet: ComponentTime = field(default_factory=ComponentTime)
    vae_decode: ComponentTime = field(default_factory=ComponentTime)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def reset(self) -> None:
        self.text, self.unet, self.vae_decode = ComponentTime(), ComponentTime(), ComponentTime()

    @contextmanager
    def attach(self, text_encoder, unet, vae) -> Iterator[ComponentTimers]:
        """Install the timers on these modules for the duration of the block; removed afterwards."""
        self._hook(text_encoder, "text", lambda args, kwargs: 1)
        self._hook(unet, "unet", _sample_rows)
        self._wrap_decode(vae)
        try:
            yield self
        finally:
            while self._undo:
                self._undo.pop()()

    def _hook(self, module: torch.nn.Module, name: str, count: Callable) -> None:
        started: list[float] = []

        def before(mod, args, kwargs):
            synchronize(self.device)
            started.append(time.perf_counter())
            getattr(self, name).calls += count(args, kwargs)

        def after(mod, args, kwargs, output):
            synchronize(self.device)
            getattr(self, name).seconds += time.perf_counter() - started.pop()

        handles = [
            module.register_forward_pre_hook(before, with_kwargs=True),
            module.register_forward_hook(after, with_kwargs=True),
        ]
        self._undo.append(lambda: [h.remove() for h in handles])

    def _wrap_decode(self, vae) -> None:
        decode = vae.decode  # the bound method (diffusers' apply_forward_hook wrapper included)
        shadowed = vars(vae).get("decode")  # an instance attribute already there, put back afterwards

        def timed_decode(*args, **kwargs):
            with stopwatch(self.device) as seconds:
                out = decode(*args, **kwargs)
            self.vae_decode.seconds += seconds[0]
            self.vae_decode.calls += 1
            return out

        def undo() -> None:
            if shadowed is None:
                vars(vae).pop("decode", None)
            else:
                vae.decode = shadowed

        vae.decode = timed_decode  # shadows the class's method on this instance only
        self._undo.append(undo)


def _sample_rows(args, kwargs) -> int:
    sample = args[0] if args else kwargs["sample"]
    return int(sample.shape[0])


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device | str) -> dict:
    """What the numbers were measured on: versions, device, CPU count, torch threads, load average."""
    import diffusers

    device = torch.device(device)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


__all__ = [
    "ComponentTime",
    "ComponentTimers",
    "MemoryGauge",
    "PeakMemory",
    "environment",
    "load_average",
    "stopwatch",
    "synchronize",
]
