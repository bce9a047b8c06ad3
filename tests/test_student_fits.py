"""The real tiny AnimateDiff student, trained with the reflow objective, fits its targets (loss falls)."""

import torch

from perflow_video.families import FamilySpec, get_family
from perflow_video.method.noise_schedule import alphas_cumprod_from_scheduler_config
from perflow_video.method.reflow_objective import ReflowConfig, reflow_loss, sample_times
from perflow_video.tiny.tiny_models import save_tiny_model


def test_motion_module_training_lowers_the_reflow_loss_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    folder = save_tiny_model("animatediff", tmp_path / "ad")
    family = get_family("animatediff")
    spec = FamilySpec(str(folder), str(folder / "motion_adapter"), None, None, None, 64, 4)
    models = family.load(spec)
    family.set_trainable(models.student, "motion")
    abar = alphas_cumprod_from_scheduler_config(models.scheduler_config)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 4, 8, 8, generator=g)  # (B, C, F, h, w), unit-scale like real latents
    noise = torch.randn(z0.shape, generator=g)
    times = sample_times(2, 4, 1000, False, g)
    cond = family.encode_prompts(models, ["a red circle moving left", "a blue square moving up"], "cpu")
    cfg = ReflowConfig(solver_steps=2, parameterization="ddim_eps")
    params = [p for p in models.student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(25):
        out = reflow_loss(models.student, models.teacher, z0, abar, cfg, cond, noise=noise, times=times)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0], losses
    assert not any(p.grad is not None for p in models.teacher.parameters())
