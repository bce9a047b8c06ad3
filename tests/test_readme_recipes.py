"""The README's Python recipes run as printed on a finished tiny run (extracted from README.md, not copied)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = re.compile(r"<!-- recipe: (?P<name>[^>]+?) -->\n```python\n(?P<code>.*?)```", re.S)


def readme_recipes() -> dict[str, str]:
    return {m["name"]: m["code"] for m in RECIPE.finditer((REPO / "README.md").read_text())}


def test_the_readme_has_the_recipes_the_issue_lists():
    assert set(readme_recipes()) == {"sample the run", "delta on another checkpoint", "motion lora"}
    for code in readme_recipes().values():
        assert (
            len([line for line in code.splitlines() if line and not line.startswith(("from", "import"))])
            <= 10
        )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding outputs/tiny-animatediff: 2 steps of the README's first command (~15 s)."""
    root = tmp_path_factory.mktemp("readme")
    env = {
        **os.environ,
        "PERFLOW_VIDEO_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, str(REPO / "scripts" / "train_animatediff.py"), "--output_dir",
        str(root / "outputs" / "tiny-animatediff"), "--max_train_steps", "2", "run.validation_prompts=[]",
        "run.eval_steps=0", "reflow.solver_steps=2", "optim.train_batch_size=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("PERFLOW_VIDEO_CACHE", env["PERFLOW_VIDEO_CACHE"])
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


@pytest.mark.parametrize("name", ["sample the run", "delta on another checkpoint", "motion lora"])
def test_recipe_runs_as_printed(workdir, name):
    namespace: dict = {}
    exec(compile(readme_recipes()[name], f"README recipe {name!r}", "exec"), namespace)  # noqa: S102
    frames = namespace["frames"]
    assert frames.ndim == 4 and frames.shape[0] == 16 and torch.isfinite(frames).all()
    if name == "sample the run":
        assert (workdir / "clip.mp4").stat().st_size > 0
    if name == "motion lora":  # both LoRAs drive the sample (diffusers activates only the last one loaded)
        assert set(namespace["pipe"].get_active_adapters()) == {"perflow", "perflow_spatial"}


def test_the_recipes_agree_on_what_the_delta_does(workdir):
    """The run's student (first recipe) == the checkpoint + motion adapter + ΔW (second): same UNet weights."""
    unets = []
    for name in ("sample the run", "delta on another checkpoint"):
        namespace: dict = {}
        exec(compile(readme_recipes()[name], name, "exec"), namespace)  # noqa: S102
        unets.append(namespace["pipe"].unet.state_dict())
    assert set(unets[0]) == set(unets[1])
    for key, value in unets[0].items():
        assert torch.allclose(value, unets[1][key], atol=1e-6), key
