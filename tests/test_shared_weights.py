"""The student shares every frozen weight with the teacher: one copy in memory, the very same tensors, which
training never changes; the teacher's own weights alone go to the frozen dtype; on the real SD1.5 + v1-5-2
architecture that saves the whole frozen SD1.5 UNet (859.5M fp32 weights, 3.44 GB)."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from perflow_video.architectures import component_config
from perflow_video.families import FamilySpec, get_family
from perflow_video.families.animatediff import motion_unet
from perflow_video.families.base import shared_with_teacher
from perflow_video.families.loading import shipped_configs
from perflow_video.method.noise_schedule import make_alphas_cumprod
from perflow_video.method.reflow_objective import ReflowConfig
from perflow_video.tiny.tiny_models import save_tiny_model, tiny_motion_adapter, tiny_unet
from perflow_video.training.frozen_models import FrozenModel, place_frozen_models
from perflow_video.training.step import per_sample_draws, perflow_step

FRAMES = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model("animatediff", tmp_path_factory.mktemp("ad") / "model")


def load(folder, trainable, family="animatediff"):
    spec = FamilySpec(
        str(folder), str(folder / "motion_adapter"), None, None, None, 64, FRAMES, student_trainable=trainable
    )
    models = get_family(family).load(spec)
    get_family(family).set_trainable(models.student, trainable or "motion")
    return models


@pytest.mark.parametrize("trainable", ["motion", "spatial"])
def test_frozen_student_weights_are_the_teachers_own_tensors(folder, trainable):
    models = load(folder, trainable)
    teacher = dict(models.teacher.named_parameters())
    for name, param in models.student.named_parameters():
        trains = get_family("animatediff").trains(name, trainable)
        assert param.requires_grad == trains and not teacher[name].requires_grad, name
        if trains:  # a copy of its own, equal to the teacher's at the start
            assert param.data_ptr() != teacher[name].data_ptr() and torch.equal(param, teacher[name])
        else:  # the same Parameter object, hence the same storage
            assert param is teacher[name] and param.data_ptr() == teacher[name].data_ptr(), name
    shared = shared_with_teacher(models.student)
    assert shared and shared == {n for n in teacher if not get_family("animatediff").trains(n, trainable)}


def test_a_full_copy_shares_nothing_and_all_trains_everything(folder):
    for trainable in (None, "all"):
        models = load(folder, trainable)
        teacher_ptrs = {p.data_ptr() for p in models.teacher.parameters()}
        assert not shared_with_teacher(models.student)
        assert not teacher_ptrs & {p.data_ptr() for p in models.student.parameters()}


def test_a_student_refuses_to_train_what_it_shares(folder):
    models = load(folder, "motion")
    with pytest.raises(ValueError, match="shares with the teacher"):
        get_family("animatediff").set_trainable(models.student, "spatial")
    assert not any(p.requires_grad for p in models.teacher.parameters())


def test_training_steps_change_only_the_trained_weights_never_the_teacher(folder):
    models = load(folder, "motion")
    teacher = FrozenModel(models.teacher, torch.float32)
    before = {k: v.clone() for k, v in models.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in models.student.state_dict().items()}
    reflow = ReflowConfig(num_time_windows=4, solver_steps=2, parameterization="ddim_eps")
    abar = make_alphas_cumprod(beta_schedule="linear")
    family = get_family("animatediff")
    g = torch.Generator().manual_seed(0)
    z_0 = torch.randn(2, 4, FRAMES, 8, 8, generator=g)
    text = family.encode_text(models, ["a red circle", "a blue square"], "cpu")
    empty = family.encode_text(models, [""], "cpu")
    probe = (z_0, torch.tensor([500.0, 500.0]), family.expand_conditioning(models, text))
    with torch.no_grad():
        out_before = teacher(probe[0], probe[1], probe[2].encoder_hidden_states)
    params = [p for p in models.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for step in range(3):
        draws = per_sample_draws(torch.tensor([0, 1]), (4, FRAMES, 8, 8), 0, step, 0.0, reflow, 1000)
        loss, _ = perflow_step(
            models.student, teacher, z_0, text, empty, draws, abar, reflow,
            expand=lambda c: family.expand_conditioning(models, c),
        )  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert torch.equal(teacher(probe[0], probe[1], probe[2].encoder_hidden_states), out_before)
    after = models.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    changed = {k for k, v in models.student.state_dict().items() if not torch.equal(v, student_before[k])}
    assert changed and all("motion_modules" in k for k in changed)


def test_the_frozen_dtype_casts_the_teachers_own_weights_not_the_shared_ones(folder):
    models = load(folder, "motion")
    shared = [p for p in models.student.parameters() if not p.requires_grad]
    place_frozen_models(models, "cpu", torch.bfloat16)
    teacher = dict(models.teacher.named_parameters())
    for name, param in models.student.named_parameters():
        assert param.dtype == torch.float32, name  # the student keeps full precision
        assert teacher[name].dtype == (torch.bfloat16 if param.requires_grad else torch.float32), name
    assert all(p is teacher[n] for n, p in models.student.named_parameters() if not p.requires_grad)
    assert len(shared) == len([p for p in teacher.values() if p.dtype == torch.float32])
    assert all(p.dtype == torch.bfloat16 for p in models.vae.parameters())
    assert all(b.dtype == torch.bfloat16 for b in models.teacher.buffers() if b.is_floating_point())


def test_the_motion_unet_takes_the_tensors_from_unet2d_would_copy():
    unet, adapter = tiny_unet("sd15"), tiny_motion_adapter()
    built, reference = motion_unet(unet, adapter).state_dict(), UNetMotionModel.from_unet2d(unet, adapter)
    assert set(built) == set(reference.state_dict())
    assert all(torch.equal(v, built[k]) for k, v in reference.state_dict().items())
    assert built["conv_in.weight"].data_ptr() == unet.conv_in.weight.data_ptr()  # no copy


@pytest.mark.parametrize("version", ["motion_adapter_v1_5", "motion_adapter_v1_5_2", "motion_adapter_v1_5_3"])
def test_every_shipped_adapter_fits_the_motion_unet_key_by_key(version):
    with init_empty_weights(include_buffers=True):
        unet = UNet2DConditionModel.from_config(component_config("sd15", "unet"))
        model = motion_unet(unet, MotionAdapter.from_config(component_config(version)))  # strict load
    assert sum(p.numel() for p in model.parameters()) > 859_520_964


def unique_bytes(models) -> int:
    modules = [models.teacher, models.student, models.vae, *models.text_encoders]
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_sharing_saves_the_frozen_sd15_unet_on_the_real_architecture():
    family = get_family("animatediff")
    sizes = {}
    for trainable in (None, "motion"):
        spec = FamilySpec("tiny", None, None, None, None, 384, 16, None, "random", trainable)
        with init_empty_weights(include_buffers=True):
            models = family.random_models(spec, shipped_configs("animatediff", None))
        sizes[trainable] = unique_bytes(models)
    assert sizes[None] - sizes["motion"] == 859_520_964 * 4  # the SD1.5 UNet, fp32: 3.44 GB


def test_a_checkpoint_of_a_sharing_student_resumes_its_weights_and_leaves_the_teacher(folder, tmp_path):
    """What a resumed run does: accelerate saves and loads the prepared student and its optimizer."""
    from accelerate import Accelerator

    models = load(folder, "motion")
    teacher_before = {k: v.clone() for k, v in models.teacher.state_dict().items()}
    params = [p for p in models.student.parameters() if p.requires_grad]
    accelerator = Accelerator(cpu=True)
    student, optimizer = accelerator.prepare(models.student, torch.optim.AdamW(params, lr=1e-2))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    accelerator.save_state(str(tmp_path / "checkpoint"))
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    accelerator.load_state(str(tmp_path / "checkpoint"))
    assert all(torch.equal(v, saved[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in models.teacher.state_dict().items())
    teacher = dict(models.teacher.named_parameters())
    assert all(p is teacher[n] for n, p in student.named_parameters() if not p.requires_grad)
