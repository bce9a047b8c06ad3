"""What the shipped weights can do (docs/tiny_teacher.md, docs/evidence.md): the tiny teacher's 50-step clips
show the prompted colour and shape to the pixel probe, and its committed PeRFlow student (its ΔW in the
package) samples in 4 steps closer to the teacher's many-step DDIM output than the teacher's own 4-step DDIM,
from the same noise, on prompts spread over colours, shapes and directions ("The committed student")."""

from __future__ import annotations

import pytest

from perflow_video.evaluation.evidence_models import load_student, load_teacher
from perflow_video.evaluation.evidence_samplers import (
    TEACHER,
    SamplerSpec,
    SampleStore,
    make_items,
    reference_spec,
    select_prompts,
)
from perflow_video.evaluation.sampling import per_sample_rms
from perflow_video.families.loading import resolve_model_path
from perflow_video.tiny.embedded_teacher import TINY_TEACHER_STUDENT_DELTA
from perflow_video.toy.probe import score_clip
from perflow_video.weights.delta_sources import read_delta

PROMPTS = 8  # spread over the 72 (select_prompts): every colour, shape and direction
REFERENCE_STEPS = 50  # DDIM-50 is within 0.012 (median latent RMS) of the table's DDIM-100 and half the cost
# Measured (committed ΔW, 8 clips): median RMS PeRFlow-4 0.098 vs DDIM-4 0.137 (0.72x); closer on 5 of 8 clips
# (on the other three the 4-step sample lands in another mode than the reference, e.g. the object elsewhere,
# for both samplers: there DDIM-4 is at 0.12 - 0.66 and PeRFlow-4 at 0.13 - 0.97).
MARGIN = 0.8
WINS = 5


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(resolve_model_path("tiny-teacher", "animatediff"), 16)


def test_the_teachers_50_step_clips_show_the_prompted_colour_and_shape(teacher):
    """DDIM-50 at CFG 5 (the teacher's own evaluation setting). Measured on these 8 clips: colour 8/8,
    shape 6/8, direction 1/8 (the teacher does not bind direction: README, Known limitations). Chance:
    colour 1/6, shape 1/3."""
    items = make_items(select_prompts(str(PROMPTS)), 1)
    store = SampleStore(teacher, {}, batch=PROMPTS, cache_dir=None, progress=False)
    clips = teacher.decode(store.latents(reference_spec(5.0, 50), items))
    scores = [score_clip(clip, it.prompt) for clip, it in zip(clips, items, strict=True)]
    assert sum(s["color"] for s in scores) >= 7, scores
    assert sum(s["shape"] for s in scores) >= 5, scores


@pytest.fixture(scope="module")
def distances(teacher):
    """Per-clip latent RMS to DDIM-50 (w = 1) of the teacher's DDIM-4 (trailing) and the student's PeRFlow-4."""
    student = load_student("committed", str(TINY_TEACHER_STUDENT_DELTA), teacher)
    store = SampleStore(teacher, {"committed": student}, batch=PROMPTS, cache_dir=None, progress=False)
    items = make_items(select_prompts(str(PROMPTS)), 1)
    ref = store.latents(reference_spec(1.0, REFERENCE_STEPS), items)
    ddim = store.latents(SamplerSpec(TEACHER, "ddim", "trailing", 1.0, 4), items)
    perflow = store.latents(SamplerSpec("committed", "perflow", None, 1.0, 4), items)
    return per_sample_rms(ddim, ref), per_sample_rms(perflow, ref)


def test_the_committed_delta_is_a_perflow_student_of_the_shipped_teacher():
    _, meta = read_delta(TINY_TEACHER_STUDENT_DELTA)
    assert (meta.family, meta.parameterization, meta.num_time_windows, meta.cfg_mode) == (
        "animatediff", "ddim_eps", 4, "sync",
    )  # fmt: skip
    assert '"pretrained_model_name_or_path": "tiny-teacher"' in meta.resolved_config


def test_perflow_4_with_the_committed_delta_beats_the_teachers_ddim_4(distances):
    ddim, perflow = distances
    assert perflow.median() < MARGIN * ddim.median(), (perflow.tolist(), ddim.tolist())
    assert int((perflow < ddim).sum()) >= WINS, (perflow.tolist(), ddim.tolist())
