"""The benchmarks cannot rot: ``scripts/benchmark_gpu.py --smoke`` runs every section on the CPU, and
``scripts/benchmark_generate.py`` on the tiny default writes its table with the right UNet-evaluation counts
and a time split inside the total. Real diffusers models throughout (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from perflow_video.evaluation.benchmark_generate import ClipSize, measure_generation
from perflow_video.evaluation.benchmark_gpu import SECTIONS, Report, run_section, smoke_plan
from perflow_video.evaluation.benchmark_timing import ComponentTimers, MemoryGauge
from perflow_video.evaluation.benchmark_train_step import TRAINING_CASES

REPO = Path(__file__).resolve().parent.parent
NUMBERS = ("seconds", "text_seconds", "unet_seconds", "vae_decode_seconds", "other_seconds", "speedup")
TRAINING_NUMBERS = ("solve_seconds", "student_seconds", "total_seconds", "loss", "peak_memory_mib")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture
def offline_tiny(cache, tmp_path, monkeypatch):
    """Offline, one torch thread, a private tiny-model cache, and a working directory without a tiny run."""
    monkeypatch.setenv("PERFLOW_VIDEO_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_benchmark_gpu_smoke_writes_every_section(tmp_path, cache):
    out = tmp_path / "out"
    env = {**os.environ, "PERFLOW_VIDEO_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_gpu.py"), "--smoke", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert seconds < 90, f"the smoke run took {seconds:.0f} s"
    payload = json.loads((out / "benchmark_gpu.json").read_text())
    markdown = (out / "benchmark_gpu.md").read_text().splitlines()
    assert sum(line.startswith("|---") for line in markdown) == 3  # models, training, generation tables
    assert payload["mode"] == "smoke" and set(payload["sections"]) == set(SECTIONS)
    assert all(s["status"] == "ok" for s in payload["sections"].values()), payload["sections"]
    assert payload["sections"]["models"]["full"]["unet_motion"] > 1.2e9  # SD1.5 UNet + v1-5-2 adapter
    cases = payload["sections"]["training"]["cases"]
    assert [c["name"] for c in cases] == [c.name for c in TRAINING_CASES]
    measured = [c for c in cases if c["status"] == "ok"]
    assert len(measured) >= 4 and all(c["status"].startswith("skipped") for c in cases if c not in measured)
    for case in measured:
        assert all(_finite(case[k]) for k in TRAINING_NUMBERS), case
        assert case["total_seconds"] == pytest.approx(case["solve_seconds"] + case["student_seconds"])
    lora = [c for c in measured if c["trainable"] == "motion_lora"]
    full = [c for c in measured if c["trainable"] == "motion"]
    assert (
        lora
        and full
        and max(c["trainable_parameters"] for c in lora) < min(c["trainable_parameters"] for c in full)
    )
    sizes = payload["sections"]["generation"]["sizes"]
    assert [s["label"] for s in sizes] == ["4×32×32", "4×64×64"] and all(s["status"] == "ok" for s in sizes)
    for size in sizes:
        assert [r["unet_evaluations"] for r in size["rows"]] == [4, 8, 50]
        assert all(_finite(r[k]) for r in size["rows"] for k in NUMBERS)


def test_benchmark_generate_tiny_default_table(offline_tiny):
    out = offline_tiny / "bench"
    status = _script_main("benchmark_generate")(["--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert status == 0
    payload = json.loads((out / "benchmark_generate.json").read_text())
    table = (out / "benchmark_generate.md").read_text()
    rows = payload["rows"]
    assert [r["unet_evaluations"] for r in rows] == [4, 8, 50]
    assert [r["evaluation_limit"] for r in rows] == [12.5, 6.25, 1.0]
    assert [r["text_encoder_calls"] for r in rows] == [1, 2, 2]  # CFG encodes the empty prompt too
    for row in rows:
        split = row["text_seconds"] + row["unet_seconds"] + row["vae_decode_seconds"]
        assert 0 < split <= row["seconds"] and row["other_seconds"] >= 0
        assert row["speedup"] == pytest.approx(rows[-1]["seconds"] / row["seconds"])
        assert row["name"] in table
    assert payload["size"] == {"num_frames": 16, "height": 32, "width": 32}  # the tiny default (tiny-teacher)
    assert len(payload["environment"]["load_average_start"]) == 3


def test_benchmark_generate_flag_error_before_loading(offline_tiny, capsys):
    main = _script_main("benchmark_generate")
    assert main(["--repeats", "0", "--out", str(offline_tiny / "x")]) == 2
    assert "--repeats 0" in capsys.readouterr().err and not (offline_tiny / "x").exists()


def test_unet_evaluations_are_counted_forward_rows(offline_tiny):
    """An independent hook on the UNet: 4 / 4 / 25 forward calls with 1 / 2 / 2 rows each."""
    from perflow_video.generation.model_source import load_tiny_teacher

    loaded = load_tiny_teacher(num_frames=2)
    pipe = loaded.family.pipeline(loaded.models, loaded.student, loaded.scheduler)
    calls: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        rows = measure_generation(
            pipe, loaded.scheduler, loaded.models.scheduler_config, ClipSize(2, 32, 32), repeats=1, warmup=0
        )
    finally:
        handle.remove()
    assert len(calls) == 4 + 4 + 25 and sum(calls) == 4 + 8 + 50
    assert [r.median.unet_evaluations for r in rows] == [4, 8, 50]
    assert pipe.scheduler is loaded.scheduler  # put back after the DDIM row
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks
    assert "decode" not in vars(pipe.vae)  # the timer's wrapper is gone


def test_component_timers_split_inside_total():
    timers = ComponentTimers(torch.device("cpu"))
    text, unet, vae = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Module()
    own_decode = vae.decode = lambda x: x  # an instance attribute: put back afterwards
    with timers.attach(text, unet, vae):
        text(torch.zeros(1, 4))
        unet(torch.zeros(3, 4))
        vae.decode(torch.zeros(1))
    assert (timers.text.calls, timers.unet.calls, timers.vae_decode.calls) == (1, 3, 1)
    assert all(t.seconds > 0 for t in (timers.text, timers.unet, timers.vae_decode))
    assert not text._forward_pre_hooks and not unet._forward_hooks and vae.decode is own_decode


def test_memory_gauge_sees_a_large_allocation():
    with MemoryGauge("cpu").measure() as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        del block
    assert memory[0].peak_mib > 0
    if memory[0].method.startswith("VmHWM"):
        assert memory[0].delta_mib > 48


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path):
    report = Report(smoke_plan(budget_s=60), tmp_path)

    def out_of_memory(section):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    run_section(report, "training", out_of_memory)
    run_section(report, "models", lambda section: section.update(answer=42))
    saved = json.loads((tmp_path / "benchmark_gpu.json").read_text())["sections"]
    assert saved["training"]["status"] == "error" and "OutOfMemoryError" in saved["training"]["error"]
    assert saved["models"] == {**saved["models"], "status": "ok", "answer": 42}
    assert "## training: error (OutOfMemoryError" in (tmp_path / "benchmark_gpu.md").read_text()


def test_time_budget_skips_sections(tmp_path):
    report = Report(smoke_plan(budget_s=0), tmp_path)
    run_section(report, "generation", lambda section: pytest.fail("ran past the budget"))
    assert report.payload["sections"]["generation"]["status"] == "skipped: time budget"
