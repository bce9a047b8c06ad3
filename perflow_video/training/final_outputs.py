"""What a finished run leaves in ``--output_dir`` (README "Outputs"):

* ``student/``: the student in diffusers layout (a LoRA run's with the adapters merged) (``unet/``; AnimateDiff: ``unet_motion/`` and
  ``motion_adapter/`` on its own),
* ``scheduler/``: the PeRFlowScheduler config that samples it,
* ``delta_weights.safetensors``: ΔW = student - teacher for what trained, with metadata, in the family's
  ``delta_layout``,
* what else the family's users load (``ModelFamily.write_extra_outputs``); AnimateDiff with trained
  motion modules, for tools that read the original layout: ``delta_weights_motion_original.safetensors``
  (ΔW) and ``perflow_motion_module.safetensors`` (the full accelerated motion module, pos_encoder included),
* a LoRA run: the trained adapter, ``perflow_lora_adapter.safetensors`` (``trained_weights``),
* the ``run.export_formats`` the ΔW has keys for (``weights.delta_export``): LoRAs of rank <= ``run.lora_rank``
  for diffusers / ComfyUI / A1111, exact ``.diff`` patches, motion LoRAs.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from perflow_video.families import FamilyModels, ModelFamily
from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.scheduler import perflow_scheduler_for
from perflow_video.training.config_io import to_dict
from perflow_video.training.train_config import TrainConfig
from perflow_video.weights.delta_export import applicable_formats, export_all
from perflow_video.weights.delta_weights import DeltaMetadata, save_delta_weights


def delta_metadata(
    family: str, cfg: TrainConfig, reflow: ReflowConfig, base_model: str, layout: str
) -> DeltaMetadata:
    return DeltaMetadata(
        family=family,
        base_model=base_model,
        parameterization=reflow.parameterization,
        num_time_windows=reflow.num_time_windows,
        cfg_mode="sync" if reflow.guidance_scale == 1.0 else "fixed",
        cfg_scale=float(reflow.guidance_scale),
        layout=layout,
        resolved_config=json.dumps(to_dict(cfg)),
    )


def write_final_outputs(
    family: ModelFamily,
    models: FamilyModels,
    student: torch.nn.Module,
    delta: dict[str, torch.Tensor],
    reflow: ReflowConfig,
    cfg: TrainConfig,
    out: Path,
) -> dict[str, Path]:
    """Write the student (a plain diffusers model), its scheduler and ``delta`` (ΔW, diffusers keys: what
    ``trained_weights.*.finish`` gives) in every layout the family's users load."""
    written: dict[str, Path] = {}
    family.save_student(student, str(out / "student"))
    written["student"] = out / "student"
    scheduler = perflow_scheduler_for(
        models.scheduler_config, reflow.parameterization, reflow.num_time_windows
    )
    scheduler.save_pretrained(out / "scheduler")
    written["scheduler"] = out / "scheduler"

    # layout -> the metadata of a ΔW file in that layout
    metadata_for = partial(delta_metadata, family.name, cfg, reflow, models.delta_base())
    save_delta_weights(delta, out / "delta_weights.safetensors", metadata_for(family.delta_layout))
    written["delta_weights"] = out / "delta_weights.safetensors"
    written.update(family.write_extra_outputs(student, delta, out, metadata_for))
    extra = tuple(f for f in cfg.run.export_formats if f in applicable_formats(delta))
    written.update(export_all(delta, out, metadata_for, rank=cfg.run.lora_rank, formats=extra))
    return written
