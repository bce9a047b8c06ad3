"""The evidence table (scripts/benchmark_evidence.py): references, rows, cells, CFG modes, sheets, report,
and a --quick run end to end, on the embedded random tiny AnimateDiff and two real 2-step training runs of it
(CFG-sync and CFG-fixed at w* = 3)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import offline_tiny_env, user_error
from PIL import Image

from perflow_video.errors import exit_status_of
from perflow_video.evaluation.evidence_cli import main
from perflow_video.evaluation.evidence_metrics import (
    PSNR_CAP,
    Reference,
    clip_psnr,
    diversity,
    fewest_matching_steps,
    frame_change,
    full_cell,
    latent_cell,
)
from perflow_video.evaluation.evidence_models import load_student, load_teacher
from perflow_video.evaluation.evidence_report import FIGURES, render_markdown
from perflow_video.evaluation.evidence_samplers import (
    TEACHER,
    Item,
    SamplerSpec,
    SampleStore,
    make_items,
    reference_spec,
    select_prompts,
    subset,
)
from perflow_video.evaluation.evidence_sheets import SheetLayout, contact_sheet, sheet_frames
from perflow_video.evaluation.evidence_study import Row, build_references
from perflow_video.families.loading import resolve_model_path
from perflow_video.toy.shape_world import ALL_PROMPTS
from perflow_video.toy.toy_clips import COLORS

REPO = Path(__file__).resolve().parent.parent
FRAMES = 4  # the fixture runs' model.num_frames
W, W_STAR = 2.0, 3.0  # the table's guidance; the CFG-fixed run's trained guidance
REF_STEPS = 10  # the properties hold at any count; 100 (the default) is slow on a shared CPU
LADDER = (1, 2, 4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with offline_tiny_env(tmp_path_factory.mktemp("evidence")) as environment:
        yield environment


def train(env, out: Path, *overrides: str) -> Path:
    """A real 2-step training run of the random tiny AnimateDiff (~10 s)."""
    cmd = [
        sys.executable, str(REPO / "scripts" / "train_animatediff.py"), "--output_dir", str(out),
        "--max_train_steps", "2", "model.pretrained_model_name_or_path=tiny", "model.motion_adapter=tiny", "model.resolution=64",
        "run.validation_prompts=[]", "run.eval_steps=0", f"model.num_frames={FRAMES}", "reflow.solver_steps=2",
        "optim.train_batch_size=1", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "sync": train(env, root / "sync"),
        "fixed": train(env, root / "fixed", f"reflow.guidance_scale={W_STAR}"),
    }


@pytest.fixture(scope="module")
def teacher_dir(env) -> str:
    return resolve_model_path("tiny", "animatediff")


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(teacher_dir, FRAMES)


@pytest.fixture(scope="module")
def students(teacher, runs):
    return {name: load_student(name, str(path), teacher) for name, path in runs.items()}


ITEMS = [Item(ALL_PROMPTS[0], 0), Item(ALL_PROMPTS[0], 1), Item(ALL_PROMPTS[30], 0)]


def test_the_reference_against_itself_is_an_exact_match(teacher):
    store = SampleStore(teacher, {}, batch=2, cache_dir=None, progress=False)
    ref = build_references(store, teacher, [W], REF_STEPS, ITEMS)[W]
    cell = full_cell(ref.latents, ref.pixels, ref, ITEMS)
    assert cell["rms"] == 0.0 and cell["psnr"] == PSNR_CAP and cell["temporal"] == pytest.approx(1.0)
    assert cell["reference_guidance"] == W and cell["n"] == len(ITEMS)
    assert store.timing(reference_spec(W, REF_STEPS))["unet_evals_per_clip"] == 2 * REF_STEPS  # CFG: 2 a step


def test_the_ddim_row_at_the_reference_step_count_is_the_reference(teacher):
    ref = SampleStore(teacher, {}, batch=3, cache_dir=None, progress=False).latents(
        reference_spec(W, REF_STEPS), ITEMS
    )
    store = SampleStore(teacher, {}, batch=3, cache_dir=None, progress=False)
    row = Row("teacher DDIM (trailing)", TEACHER, "ddim", "trailing", W, W)
    assert torch.equal(store.latents(row.spec(REF_STEPS), ITEMS), ref)
    other = Row("teacher DDIM (linspace)", TEACHER, "ddim", "linspace", W, W).spec(REF_STEPS)
    assert relative_rms(store.latents(other, ITEMS), ref) > 1e-3  # the spacing is honoured
    unguided = SamplerSpec(TEACHER, "ddim", "trailing", 1.0, REF_STEPS)
    assert relative_rms(store.latents(unguided, ITEMS), ref) > 1e-3  # and the guidance
    # An item's noise does not depend on its batch: one clip at a time gives the same samples (to rounding).
    single = SampleStore(teacher, {}, batch=1, cache_dir=None, progress=False)
    assert relative_rms(single.latents(row.spec(REF_STEPS), ITEMS[::-1]), ref.flip(0)) < 1e-5


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def test_a_student_recipe_is_read_from_its_run(students):
    sync, fixed = students["sync"], students["fixed"]
    assert (sync.cfg_mode, sync.trained_guidance, fixed.cfg_mode, fixed.trained_guidance) == (
        "sync", 1.0, "fixed", W_STAR,
    )  # fmt: skip
    assert sync.parameterization == "ddim_eps" and sync.num_windows == 4
    assert sync.sampling_guidance(W) == W and sync.reference_guidance(W) == W
    assert fixed.sampling_guidance(W) == 1.0 and fixed.reference_guidance(W) == W_STAR


@pytest.mark.parametrize("kind", ["sync", "fixed"])
def test_a_delta_file_student_is_its_runs_student_with_the_same_recipe(teacher, runs, students, kind):
    from_run = students[kind]
    from_delta = load_student(kind, str(runs[kind] / "delta_weights.safetensors"), teacher)
    keys = ("parameterization", "num_windows", "cfg_mode", "trained_guidance")
    assert {k: getattr(from_delta, k) for k in keys} == {k: getattr(from_run, k) for k in keys}
    assert (
        from_delta.scheduler().config["num_time_windows"] == from_run.scheduler().config["num_time_windows"]
    )
    run_state = from_run.unet.state_dict()
    worst = max((v - run_state[k]).abs().max().item() for k, v in from_delta.unet.state_dict().items())
    assert worst < 1e-6
    changed = sum(not torch.equal(v, teacher.unet.state_dict()[k]) for k, v in run_state.items())
    assert changed > 0  # the 2 training steps moved the student away from the teacher


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_cfg_fixed_student_takes_one_unet_evaluation_per_step(teacher, students, steps):
    store = SampleStore(teacher, students, batch=2, cache_dir=None, progress=False)
    for name, per_step in (("fixed", 1), ("sync", 2)):
        s = students[name]
        spec = SamplerSpec(name, "perflow", None, s.sampling_guidance(W), steps)
        store.latents(spec, ITEMS)
        assert store.timing(spec)["unet_evals_per_clip"] == per_step * steps


def test_cells_psnr_frame_change_diversity():
    a = torch.zeros(2, 3, 4, 8, 8)
    assert clip_psnr(a, a + 0.2).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # 0.1 on [0, 1]: 20 dB
    moving = torch.zeros(1, 3, 4, 8, 8)
    moving[:, :, 1::2] = 1.0  # frames alternate between 0 and 1 ([-1, 1] scale): 0.5 on [0, 1]
    assert frame_change(a).tolist() == [0.0, 0.0] and frame_change(moving).tolist() == pytest.approx([0.5])
    latents = torch.stack([torch.zeros(4), torch.full((4,), 3.0), torch.ones(4)])
    items = [Item("p", 0), Item("p", 1), Item("q", 0)]
    assert diversity(latents, items) == 3.0  # only the pair of "p"
    assert diversity(latents, [Item("p", 0), Item("q", 0), Item("r", 0)]) is None


def test_a_latent_cell_gives_the_mean_and_the_median_over_clips():
    items = [Item("p", s) for s in range(3)]
    ref = Reference(1.0, torch.zeros(3, 4, 2, 2, 2), torch.zeros(3, 3, 2, 4, 4), items)
    latents = torch.stack([torch.full((4, 2, 2, 2), v) for v in (0.1, 0.2, 3.0)])  # one clip in another mode
    cell = latent_cell(latents, ref, items[::-1])  # cells follow the items' order, not the reference's
    assert cell["rms_median"] == pytest.approx(0.2) and cell["rms"] == pytest.approx(3.3 / 3)
    assert cell["n"] == 3


def test_fewest_matching_steps():
    ladder = {1: 0.9, 2: 0.5, 4: 0.3, 8: 0.1}
    assert fewest_matching_steps(ladder, 0.3) == 4 and fewest_matching_steps(ladder, 0.05) is None


def test_prompts_and_subsets_spread_over_the_attributes():
    assert select_prompts("all") == list(ALL_PROMPTS)
    six = select_prompts("6")
    assert {p.split()[1] for p in six} == set(COLORS) and len(set(six)) == 6
    items = make_items(select_prompts("12"), 2)
    assert [it.seed for it in items[:4]] == [0, 1, 0, 1]
    assert len({it.prompt for it in subset(items, 6)}) == 6
    noise = Item("p", 1).noise((2, 3))
    assert torch.equal(noise, Item("p", 1).noise((2, 3))) and not torch.equal(
        noise, Item("p", 0).noise((2, 3))
    )


def test_contact_sheet_size_and_placement():
    clips = [torch.rand(3, 16, 32, 32) * 2 - 1 for _ in range(2)]
    frames = sheet_frames(16)
    assert frames == [0, 5, 10, 15]
    image = contact_sheet("title", [("a", clips[0]), ("b", clips[1])], frames, scale=3)
    assert image.size == (644, 224)  # 240 + 4 x (96 + 4) + 4 wide; 20 + 2 x (96 + 4) + 4 high
    x, y = 240 + 4 + 2 * 100, 20 + 4 + 100  # row 1, third frame (frame 10)
    got = torch.tensor(list(image.crop((x, y, x + 96, y + 96)).get_flattened_data()), dtype=torch.float32)
    want = ((clips[1][:, 10].clamp(-1, 1) + 1) * 127.5).round()
    want = want.repeat_interleave(3, 1).repeat_interleave(3, 2).permute(1, 2, 0).reshape(-1, 3)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def quick_run(env, teacher_dir, runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    args = ["--teacher", teacher_dir, "--student", f"sync={runs['sync']}", "--student", f"fixed={runs['fixed']}",
            "--quick", "--frames", str(FRAMES), "--cfg", str(W), "--out", str(out), "--no-progress",
            "--reference-steps", str(REF_STEPS), "--ladder-steps", ",".join(map(str, LADDER))]  # fmt: skip
    logger, threads = logging.getLogger("perflow_video.scheduler"), torch.get_num_threads()
    level = logger.level
    assert main(args) == 0
    # the run's thread count and quiet scheduler logger do not leak into the rest of the process
    assert (logger.level, torch.get_num_threads()) == (level, threads)
    return out, args


def test_quick_run_end_to_end(quick_run, teacher):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("python scripts/benchmark_evidence.py --teacher")
    labels = [row["label"] for row in results["rows"]]
    assert (
        len(labels) == 6 and labels[-2].startswith("PeRFlow sync") and labels[-1].startswith("PeRFlow fixed")
    )
    for row in results["rows"]:
        assert list(row["cells"]) == ["1", "2", "4", "8"]
    fixed = results["rows"][-1]
    assert fixed["guidance"] == 1.0 and fixed["reference_guidance"] == W_STAR
    assert [fixed["cells"][n]["unet_evals_per_clip"] for n in ("1", "2", "4", "8")] == [1, 2, 4, 8]
    assert {r["guidance"] for r in results["references"]} == {W, W_STAR}
    ladder = {lad["guidance"]: lad for lad in results["ladder"]}
    assert set(ladder) == {W, W_STAR}  # each student's PeRFlow-4 is matched against DDIM at its own reference
    assert set(ladder[W]["perflow4_rms"]) == {"sync"} and set(ladder[W_STAR]["perflow4_rms"]) == {"fixed"}
    assert all(list(map(int, lad["ddim_best_rms"])) == list(LADDER) for lad in results["ladder"])
    assert all(set(lad["perflow4_rms_median"]) == set(lad["perflow4_rms"]) for lad in results["ladder"])
    assert set(results["spacing"]) == {"ddim", "dpm++2m", "euler", "unipc"}
    # One sheet (--quick): 5 rows (teacher DDIM-50 / DDIM-4 / DPM++-4, two students) x the 4 frames.
    size = teacher.decode(torch.zeros(1, *teacher.latent_shape())).shape[-2:]
    sheet = Image.open(out / "sheets" / results["sheets"][0]["path"])
    assert sheet.size == SheetLayout(rows=5, frames=4, size=tuple(size), scale=3).image_size()
    assert len(results["sheets"]) == 1 and len(results["sheets"][0]["rows"]) == 5


def test_the_markdown_table_has_every_row_and_step(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "table.md").read_text()
    assert markdown == render_markdown(results)
    lines = markdown.splitlines()
    for row in results["rows"]:
        mine = [line for line in lines if line.startswith(f"| {row['label']} |")]
        assert len(mine) == len(FIGURES)
        assert all(line.count(" | ") == 3 + 4 - 1 for line in mine)
    for n in (1, 2, 4, 8):
        assert sum(f"| {n} steps |" in line for line in lines) == len(FIGURES)
    assert "teacher DDIM steps that match PeRFlow-4" in markdown and "sheets/sheet_00_" in markdown


def test_a_rerun_reuses_the_cached_teacher_samples(quick_run):
    out, args = quick_run
    first = json.loads((out / "results.json").read_text())
    assert main([*args, "--student", "again=" + args[3].split("=", 1)[1]]) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["references"] == first["references"]  # loaded, with the timing first measured
    assert second["rows"][0]["cells"] == first["rows"][0]["cells"]
    assert len(second["rows"]) == 7


def test_user_errors(teacher_dir, tmp_path, capsys):
    def run(*args: str) -> int:
        return exit_status_of(lambda: main(["--teacher", teacher_dir, "--out", str(tmp_path), *args]), False)

    assert run("--student", "nameless") == 2
    user_error(capsys, "--student 'nameless'", "NAME=RUN_DIR")
    assert run("--student", f"x={tmp_path / 'nope'}") == 2
    user_error(capsys, "no such folder")
    assert run("--steps", "4,0") == 2
    user_error(capsys, "--steps")


def test_a_lora_rank_student_is_the_teacher_with_its_lora_files_loaded_by_diffusers(
    teacher, teacher_dir, runs, tmp_path
):
    """``FILE,rank=R`` (claim (f)'s LoRA rows) is what a user gets from the rank-R LoRA files through
    AnimateDiffPipeline.load_lora_weights: spatial PEFT LoRA + motion LoRA, fused."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from perflow_video.weights.delta_export import export_delta
    from perflow_video.weights.delta_weights import load_delta_weights, save_delta_weights

    _, meta = load_delta_weights(runs["sync"] / "delta_weights.safetensors")
    gen = torch.Generator().manual_seed(11)
    delta = {k: 1e-2 * torch.randn(p.shape, generator=gen) for k, p in teacher.unet.named_parameters()}
    save_delta_weights(delta, tmp_path / "delta.safetensors", meta)  # spatial + motion, every weight
    student = load_student("lora2", f"{tmp_path / 'delta.safetensors'},rank=2", teacher)
    assert student.run_dir.endswith(",rank=2") and student.describe() == "B, K=4, CFG-sync"

    pipe = AnimateDiffPipeline.from_pretrained(
        teacher_dir, motion_adapter=MotionAdapter.from_pretrained(Path(teacher_dir) / "motion_adapter")
    )
    for fmt in ("lora_peft", "motion_lora_diffusers"):
        pipe.load_lora_weights(str(export_delta(delta, fmt, tmp_path / f"{fmt}.safetensors", rank=2)),
                               adapter_name=fmt)  # fmt: skip
    pipe.set_adapters(["lora_peft", "motion_lora_diffusers"])  # else only the last loaded one is active
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    loaded, ours, base = pipe.unet.state_dict(), student.unet.state_dict(), teacher.unet.state_dict()
    assert max((loaded[k] - v).abs().max().item() for k, v in ours.items()) < 1e-4  # ΔW entries ~1e-2
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert changed and all(k.endswith(".weight") and ours[k].ndim >= 2 for k in changed)  # no bias / norm
    assert any("motion_modules" in k for k in changed) and any("motion_modules" not in k for k in changed)


def test_a_rank_suffix_needs_a_delta_file_and_a_positive_rank(teacher, runs):
    with pytest.raises(Exception, match="needs a ΔW .safetensors file"):
        load_student("x", f"{runs['sync']},rank=2", teacher)
    with pytest.raises(Exception, match="no such ΔW file"):
        load_student("x", f"{runs['sync'] / 'missing.safetensors'},rank=2", teacher)
    with pytest.raises(Exception, match="rank must be a positive integer"):
        load_student("x", f"{runs['sync'] / 'delta_weights.safetensors'},rank=0", teacher)
