"""The evidence run (docs/evidence.md): PeRFlow students against the training-free samplers a user would pick
instead, on one teacher, from the same noise and prompts. Each phase returns plain dicts for the report.

1. **Spacing.** Each teacher sampler at 4 steps with linspace / leading / trailing timesteps on a few clips;
   the spacing closest to the reference is that sampler's for the table (reported).
2. **References.** The teacher's DDIM with ``reference_steps`` steps at every guidance a row is compared
   with: the table's w (teacher rows, CFG-sync students) and each CFG-fixed student's trained w*.
3. **Rows x steps.** Teacher DDIM / DPM++ 2M / Euler / UniPC at w, each student with its PeRFlowScheduler
   (CFG-sync at w, CFG-fixed without guidance); every cell of :mod:`.evidence_metrics`.
4. **Ladder.** Teacher DDIM at 1 ... 50 steps (:data:`LADDER_STEPS`) on a subset of clips, per compared guidance: the fewest steps
   whose RMS is at most the best PeRFlow-4 row's on the same clips.
5. **Sheets.** Contact sheets for a few prompts (:mod:`.evidence_sheets`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from perflow_video.evaluation.evidence_metrics import (
    Reference,
    fewest_matching_steps,
    full_cell,
    latent_cell,
)
from perflow_video.evaluation.evidence_models import StudentRun, Teacher
from perflow_video.evaluation.evidence_samplers import (
    REFERENCE_SPACING,
    SAMPLER_LABELS,
    SPACINGS,
    TEACHER,
    TEACHER_SAMPLERS,
    Item,
    SamplerSpec,
    SampleStore,
    reference_spec,
    subset,
)
from perflow_video.evaluation.evidence_sheets import contact_sheet, save_png, sheet_frames

LADDER_STEPS = (1, 2, 4, 8, 12, 16, 25, 35, 50)
SPACING_STEPS = 4
SHEET_TEACHER_STEPS = 50
SHEET_STEPS = 4


@dataclass(frozen=True)
class Settings:
    """What the run measures (besides models and items)."""

    steps: tuple[int, ...]
    cfg: float
    reference_steps: int
    ladder_clips: int
    spacing_clips: int
    sheets: int
    ladder_steps: tuple[int, ...] = LADDER_STEPS
    sheet_scale: int = 3


@dataclass(frozen=True)
class Row:
    """A row of the table: a model and sampler at a guidance, compared with the reference at another."""

    label: str
    model: str
    kind: str
    spacing: str | None
    guidance: float
    reference_guidance: float

    def spec(self, steps: int) -> SamplerSpec:
        return SamplerSpec(self.model, self.kind, self.spacing, self.guidance, steps)


def choose_spacings(
    store: SampleStore, references: dict[float, Reference], items: list[Item], w: float
) -> dict:
    """Per teacher sampler: RMS to the reference at 4 steps for each spacing, and the closest (its choice)."""
    study = {}
    for kind in TEACHER_SAMPLERS:
        rms = {
            spacing: latent_cell(
                store.latents(SamplerSpec(TEACHER, kind, spacing, w, SPACING_STEPS), items),
                references[w],
                items,
            )["rms"]
            for spacing in SPACINGS
        }
        study[kind] = {"chosen": min(rms, key=rms.get), "rms": rms, "steps": SPACING_STEPS, "n": len(items)}
    return study


def teacher_rows(spacings: dict, w: float) -> list[Row]:
    return [
        Row(f"teacher {SAMPLER_LABELS[kind]} ({spacings[kind]['chosen']})", TEACHER, kind,
            spacings[kind]["chosen"], w, w)
        for kind in TEACHER_SAMPLERS
    ]  # fmt: skip


def student_rows(students: dict[str, StudentRun], w: float) -> list[Row]:
    return [
        Row(f"PeRFlow {name} ({s.describe()})", name, "perflow", None, s.sampling_guidance(w),
            s.reference_guidance(w))
        for name, s in students.items()
    ]  # fmt: skip


def build_references(
    store: SampleStore, teacher: Teacher, guidances: Sequence[float], steps: int, items: list[Item]
) -> dict[float, Reference]:
    """The decoded reference clips at each guidance (sampled once, cached by the store)."""
    refs = {}
    for g in dict.fromkeys(guidances):
        latents = store.latents(reference_spec(g, steps), items)
        refs[g] = Reference(g, latents, teacher.decode(latents), list(items))
    return refs


def evaluate_row(
    store: SampleStore, teacher: Teacher, row: Row, steps: Sequence[int], ref: Reference, items: list[Item]
) -> dict:
    """The row's cells at each step count (every figure, plus time and UNet evaluations per clip)."""
    cells = {}
    for n in steps:
        latents = store.latents(row.spec(n), items)
        cells[str(n)] = {
            **full_cell(latents, teacher.decode(latents), ref, items),
            **store.timing(row.spec(n)),
        }
    return {**asdict(row), "cells": cells}


def _rms_of(
    store: SampleStore, spec: SamplerSpec, ref: Reference, items: list[Item], stat: str = "rms"
) -> float:
    """``stat`` of :func:`latent_cell`: ``rms`` (the mean over clips) or ``rms_median``."""
    return latent_cell(store.latents(spec, items), ref, items)[stat]


def ddim_curves(
    store: SampleStore,
    ddim_row: Row,
    settings: Settings,
    ref: Reference,
    items: list[Item],
    stat: str = "rms",
) -> dict[str, dict[int, float]]:
    """DDIM's RMS by step count at ``ref``'s guidance: trailing (the reference's spacing: at the reference's
    step count it is the reference) at the ladder's step counts, and the table's own DDIM spacing at the table's
    step counts where that differs (already sampled for the table's row at w)."""
    g = ref.guidance
    ladder = settings.ladder_steps
    curves = {REFERENCE_SPACING: {n: _rms_of(store, reference_spec(g, n), ref, items, stat) for n in ladder}}
    if ddim_row.spacing != REFERENCE_SPACING and ddim_row.guidance == g:
        curves[ddim_row.spacing] = {
            n: _rms_of(store, ddim_row.spec(n), ref, items, stat) for n in settings.steps
        }
    return curves


def ladder(
    store: SampleStore, rows: list[Row], refs: dict[float, Reference], items: list[Item], settings: Settings
) -> list[dict]:
    """Per compared guidance: DDIM's RMS by step count (each count at its closer spacing) and the fewest DDIM
    steps whose RMS is at most the best PeRFlow-4 row's, on the same ``items``."""
    ddim_row, w = rows[0], rows[0].guidance
    results = []
    for g in dict.fromkeys([w, *(r.reference_guidance for r in rows if r.kind == "perflow")]):
        entry = {"guidance": g, "n": len(items)}
        for stat, suffix in (("rms", ""), ("rms_median", "_median")):  # the mean over clips, and the median
            curves = ddim_curves(store, ddim_row, settings, refs[g], items, stat)
            best_ddim = {n: min(c[n] for c in curves.values() if n in c) for n in settings.ladder_steps}
            students = {
                r.model: _rms_of(store, r.spec(SHEET_STEPS), refs[g], items, stat)
                for r in rows
                if r.kind == "perflow" and r.reference_guidance == g
            }
            best = min(students, key=students.get) if students else None
            match = fewest_matching_steps(best_ddim, students[best]) if best else None
            entry |= {f"ddim_rms{suffix}": curves, f"ddim_best_rms{suffix}": best_ddim,
                      f"perflow4_rms{suffix}": students, f"best{suffix}": best, f"matching_steps{suffix}": match}  # fmt: skip
        results.append(entry)
    return results


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def sheet_rows(rows: list[Row], spacings: dict, w: float) -> list[tuple[str, SamplerSpec]]:
    """(caption, spec) of the sheet rows: teacher DDIM-50 (trailing, like the reference and the ladder), DDIM-4 and
    DPM++ 2M-4 (the table's spacings), then PeRFlow-4 of each student."""
    ddim, dpm = spacings["ddim"]["chosen"], spacings["dpm++2m"]["chosen"]
    out = [
        (f"teacher DDIM-{SHEET_TEACHER_STEPS} w={w:g}", reference_spec(w, SHEET_TEACHER_STEPS)),
        (f"teacher DDIM-{SHEET_STEPS} ({ddim}) w={w:g}", SamplerSpec(TEACHER, "ddim", ddim, w, SHEET_STEPS)),
        (
            f"teacher DPM++ 2M-{SHEET_STEPS} ({dpm}) w={w:g}",
            SamplerSpec(TEACHER, "dpm++2m", dpm, w, SHEET_STEPS),
        ),
    ]
    for r in rows:
        if r.kind == "perflow":
            cfg = f"w={r.guidance:g}" if r.guidance != 1.0 else "no CFG"
            out.append((f"PeRFlow-{SHEET_STEPS} {r.model} {cfg}", r.spec(SHEET_STEPS)))
    return out


def write_sheets(
    store: SampleStore, teacher: Teacher, specs: list[tuple[str, SamplerSpec]], items: list[Item], out: Path,
    scale: int,
) -> list[dict]:  # fmt: skip
    """One PNG per item under ``out`` (``sheet_NN_<prompt>.png``); returns what each shows."""
    frames = sheet_frames(teacher.latent_shape()[1])
    written = []
    for i, item in enumerate(items):
        clips = [(caption, teacher.decode(store.latents(spec, [item]))[0]) for caption, spec in specs]
        title = f"{item.prompt!r}, seed {item.seed}; frames {', '.join(map(str, frames))}"
        path = save_png(
            contact_sheet(title, clips, frames, scale), out / f"sheet_{i:02d}_{slug(item.prompt)}.png"
        )
        written.append({"path": path.name, "prompt": item.prompt, "seed": item.seed,
                        "rows": [c for c, _ in specs], "frames": frames})  # fmt: skip
    return written


class PhaseClock:
    """Wall and CPU seconds per phase of the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {}
        self._start = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.seconds[name] = {
            "wall": round(now[0] - self._start[0], 2),
            "cpu": round(now[1] - self._start[1], 2),
        }
        self._start = now


def run_evidence(
    store: SampleStore, students: dict[str, StudentRun], settings: Settings, items: list[Item], sheets_dir: Path,
    log=print,
) -> dict:  # fmt: skip
    """Every phase of the module docstring; returns the results (without command and environment)."""
    teacher, w, clock = store.teacher, settings.cfg, PhaseClock()
    rows_s = student_rows(students, w)
    refs = build_references(
        store, teacher, [w, *(r.reference_guidance for r in rows_s)], settings.reference_steps, items
    )
    clock.lap("references")
    log(
        f"references: DDIM-{settings.reference_steps} at w = {', '.join(f'{g:g}' for g in refs)} "
        f"({clock.seconds['references']['wall']} s)"
    )
    spacings = choose_spacings(store, refs, subset(items, settings.spacing_clips), w)
    clock.lap("spacing")
    log("spacing: " + ", ".join(f"{k} {v['chosen']}" for k, v in spacings.items()))
    rows = teacher_rows(spacings, w) + rows_s
    table = []
    for row in rows:
        table.append(evaluate_row(store, teacher, row, settings.steps, refs[row.reference_guidance], items))
        log(f"row {row.label}: " + ", ".join(f"{n}: {c['rms']:.4f}" for n, c in table[-1]["cells"].items()))
    clock.lap("rows")
    ladder_items = subset(items, settings.ladder_clips)
    steps_match = ladder(store, rows, refs, ladder_items, settings)
    clock.lap("ladder")
    sheets = write_sheets(store, teacher, sheet_rows(rows, spacings, w), subset(ladder_items, settings.sheets),
                          sheets_dir, settings.sheet_scale)  # fmt: skip
    clock.lap("sheets")
    references = [
        {**refs[g].summary(), **store.timing(reference_spec(g, settings.reference_steps))} for g in refs
    ]
    return {"settings": asdict(settings), "teacher": teacher_info(teacher), "students": [s.info() for s in students.values()],
            "items": items_info(items), "spacing": spacings, "references": references, "rows": table,
            "ladder": steps_match, "sheets": sheets,
            "timings": {"phases": clock.seconds, "sampling": store.total_cost()}}  # fmt: skip


def teacher_info(teacher: Teacher) -> dict:
    return {
        "folder": teacher.folder,
        "fingerprint": teacher.fingerprint,
        "latent_shape": list(teacher.latent_shape()),
    }


def items_info(items: list[Item]) -> dict:
    prompts = list(dict.fromkeys(it.prompt for it in items))
    return {"clips": len(items), "prompts": len(prompts), "seeds": len({it.seed for it in items})}
