"""The evidence run's outputs: ``results.json`` (every cell, the settings, timings and the command) and
``table.md`` (the same as markdown tables, rows x steps, one table per figure), rendered from the results
only, so every number in the markdown is one of the JSON's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from perflow_video.evaluation.benchmark_report import finite_or_null, markdown_table, write_text_atomic

RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"


def write_results(out: Path, results: dict) -> tuple[Path, Path]:
    """``<out>/results.json`` (strict JSON: NaN/inf as null) and ``<out>/table.md``."""
    out.mkdir(parents=True, exist_ok=True)
    clean = finite_or_null(results)
    write_text_atomic(out / RESULTS_FILE, json.dumps(clean, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out / TABLE_FILE, render_markdown(clean))
    return out / RESULTS_FILE, out / TABLE_FILE


def _guidance(g: float) -> str:
    return "no CFG" if g == 1.0 else f"w={g:g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _num(fmt: str) -> Callable[[float | None], str]:
    return lambda x: "–" if x is None else format(x, fmt)


#: (title, how a cell reads) of each rows x steps table.
FIGURES: tuple[tuple[str, Callable[[dict], str]], ...] = (
    ("Latent RMS distance to the teacher's reference (lower is closer)", lambda c: _num(".4f")(c["rms"])),
    ("Median over clips of the latent RMS distance (robust to the few clips that land in another mode)",
     lambda c: _num(".4f")(c.get("rms_median"))),
    ("PSNR of the decoded clips to the decoded reference (dB, [0, 1] pixels; higher is closer)",
     lambda c: _num(".2f")(c["psnr"])),
    ("Prompt accuracy of the pixel probe: all three right (colour / shape / direction)",
     lambda c: f"{_pct(c['all'])} ({_pct(c['color'])} / {_pct(c['shape'])} / {_pct(c['direction'])})"),
    ("Temporal consistency: mean frame-to-frame change / the reference's (1 = the teacher's)",
     lambda c: _num(".3f")(c["temporal"])),
    ("Diversity: mean pairwise latent RMS across seeds of a prompt", lambda c: _num(".4f")(c["diversity"])),
    ("Time and UNet evaluations per clip (wall s / CPU s · evaluations)",
     lambda c: f"{c['seconds_per_clip']:.3f} / {c['cpu_seconds_per_clip']:.3f} s · {c['unet_evals_per_clip']:g}"),
)  # fmt: skip


def figure_table(results: dict, cell_text: Callable[[dict], str]) -> str:
    steps = [str(n) for n in results["settings"]["steps"]]
    header = ["row", "sampled at", "compared with", *(f"{n} steps" for n in steps)]
    ref_steps = results["settings"]["reference_steps"]
    body = [
        [row["label"], _guidance(row["guidance"]), f"DDIM-{ref_steps} {_guidance(row['reference_guidance'])}",
         *(cell_text(row["cells"][n]) for n in steps)]
        for row in results["rows"]
    ]  # fmt: skip
    return markdown_table(header, body)


def spacing_table(results: dict) -> str:
    spacing = results["spacing"]
    any_kind = next(iter(spacing.values()))
    header = ["sampler", *any_kind["rms"], "chosen"]
    body = [[kind, *(f"{v:.4f}" for v in s["rms"].values()), s["chosen"]] for kind, s in spacing.items()]
    return markdown_table(header, body)


def references_table(results: dict) -> str:
    header = ["reference", "clips", "all / colour / shape / direction", "frame change", "diversity",
              "wall / CPU s per clip"]  # fmt: skip
    steps = results["settings"]["reference_steps"]
    body = [
        [f"teacher DDIM-{steps} {_guidance(r['guidance'])}", r["n"],
         " / ".join(_pct(r[a]) for a in ("all", "color", "shape", "direction")),
         _num(".4f")(r["frame_change"]), _num(".4f")(r["diversity"]),
         f"{r['seconds_per_clip']:.3f} / {r['cpu_seconds_per_clip']:.3f}"]
        for r in results["references"]
    ]  # fmt: skip
    return markdown_table(header, body)


def ladder_lines(results: dict) -> list[str]:
    """The "teacher DDIM steps that match PeRFlow-4" line per compared guidance, and DDIM's RMS by steps."""
    lines = []
    for lad in results["ladder"]:
        for suffix, stat in (("", "mean"), ("_median", "median")):
            if f"ddim_best_rms{suffix}" not in lad:  # results written before the median was added
                continue
            curve = ", ".join(f"{n}: {rms:.4f}" for n, rms in lad[f"ddim_best_rms{suffix}"].items())
            where = (f"{_guidance(lad['guidance'])}, {lad['n']} clips; DDIM's {stat} RMS by steps, each at its closer "
                     f"spacing ({' / '.join(lad[f'ddim_rms{suffix}'])}): {curve}")  # fmt: skip
            best = lad[f"best{suffix}"]
            if best is None:
                lines.append(f"- DDIM at {where}")
                continue
            steps = lad[f"matching_steps{suffix}"]
            top = max(map(int, lad[f"ddim_best_rms{suffix}"]))
            found = f"**{steps}**" if steps is not None else f"more than {top}"
            lines.append(f"- **teacher DDIM steps that match PeRFlow-4** ({stat} over clips): {found} (best "
                         f"PeRFlow-4 row `{best}` at RMS {lad[f'perflow4_rms{suffix}'][best]:.4f}; {where})")  # fmt: skip
    return lines


def render_markdown(results: dict) -> str:
    """table.md: how it was made, the spacing choice, references, every figure's table, ladder, sheets."""
    s, items = results["settings"], results["items"]
    parts = [
        "# Evidence: PeRFlow against the training-free samplers\n",
        f"Command: `{results.get('command', '')}`\n",
        f"Teacher `{results['teacher']['folder']}` (fingerprint {results['teacher']['fingerprint']}); "
        f"{items['clips']} clips ({items['prompts']} prompts x {items['seeds']} seeds), same noise for every row; "
        f"table guidance w = {s['cfg']:g}; reference: the teacher's DDIM-{s['reference_steps']} (trailing) at "
        f"the row's compared guidance. Total {results['timings'].get('wall_seconds', 0):.0f} s wall, "
        f"{results['timings'].get('cpu_seconds', 0):.0f} s CPU.\n",
        "## Timestep spacing of each teacher sampler (RMS at 4 steps; the closest is used below)\n",
        spacing_table(results),
        "## References\n",
        references_table(results),
    ]
    for title, cell_text in FIGURES:
        parts += [f"## {title}\n", figure_table(results, cell_text)]
    parts += ["## Teacher DDIM steps that match PeRFlow-4\n", "\n".join(ladder_lines(results)) + "\n"]
    parts += ["## Contact sheets\n", *(sheet_line(sheet) for sheet in results["sheets"])]
    return "\n".join(parts)


def sheet_line(sheet: dict) -> str:
    rows = " / ".join(sheet["rows"])
    return f"![{sheet['prompt']}, seed {sheet['seed']}: {rows}](sheets/{sheet['path']})\n"
