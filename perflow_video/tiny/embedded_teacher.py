"""The trained tiny text-to-video teacher shipped with the package: ``tiny-teacher`` as
``model.pretrained_model_name_or_path`` / ``model.motion_adapter`` (generate.py ``--base``).

A diffusers folder (safetensors) in ``perflow_video/tiny/assets/tiny_teacher/``: an SD1.5-style pipeline
(``model_index.json``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``, ``scheduler/``) plus
``motion_adapter/`` (not in ``model_index.json``; load it explicitly, as for SD1.5 + an AnimateDiff
adapter) and ``teacher_info.json`` (training step and architecture). Its frames are 32 x 32 pixels (VAE
factor 4: 8 x 8 latents), 16 per clip; how it was built and trained: docs/tiny_teacher.md.

    adapter = MotionAdapter.from_pretrained(folder / "motion_adapter")
    pipe = AnimateDiffPipeline.from_pretrained(folder, motion_adapter=adapter)
"""

from __future__ import annotations

from pathlib import Path

from perflow_video.errors import WeightsNotFoundError

TINY_TEACHER_FOLDER = Path(__file__).resolve().parent / "assets" / "tiny_teacher"
#: A PeRFlow student of the shipped teacher, as its ΔW (``delta_weights.safetensors`` of a training run, with
#: its metadata: B, K = 4, CFG-sync): ``python scripts/generate.py --delta <this file>`` samples it and
#: ``scripts/benchmark_evidence.py --student NAME=<this file>`` measures it. Its training command:
#: docs/evidence.md ("The committed student").
TINY_TEACHER_STUDENT_DELTA = TINY_TEACHER_FOLDER.parent / "tiny_teacher_student" / "delta_weights.safetensors"
#: The subfolders the shipped teacher holds (diffusers layout).
TEACHER_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "motion_adapter", "scheduler")


def tiny_teacher_folder() -> Path:
    """The shipped teacher's folder; WeightsNotFoundError if the package was installed without its data."""
    if not (TINY_TEACHER_FOLDER / "model_index.json").is_file():
        raise WeightsNotFoundError(
            f"the embedded tiny teacher is missing from {TINY_TEACHER_FOLDER} (the package was installed "
            "without its data files): reinstall perflow-video, or give a model folder instead of tiny-teacher"
        )
    return TINY_TEACHER_FOLDER
