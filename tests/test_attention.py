"""Attention backend choice, by what ends up installed: xformers only where it can run, SDPA otherwise.

Every UNet here starts on diffusers' classic ``AttnProcessor`` (diffusers' own default on torch 2 is
already ``AttnProcessor2_0``, which would make "SDPA was installed" true whatever the code did).
"Importable" is controlled per test through ``sys.modules``, so the checks do not depend on this machine.
"""

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

from perflow_video.families.attention import configure_attention, resolve_attention_backend
from perflow_video.tiny.tiny_models import tiny_unet, tiny_unet_motion


def classic(unet):
    unet.set_attn_processor(AttnProcessor())
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
    return unet


def installed(unet) -> set[type]:
    return {type(p) for p in unet.attn_processors.values()}


@pytest.fixture
def no_xformers(monkeypatch):
    """xformers not importable (``sys.modules[name] = None`` makes import and find_spec fail / say None)."""
    monkeypatch.setitem(sys.modules, "xformers", None)


@pytest.fixture
def fake_xformers(monkeypatch):
    """An importable (empty) xformers module: enough for the availability check, not to run kernels."""
    module = types.ModuleType("xformers")
    module.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
    monkeypatch.setitem(sys.modules, "xformers", module)


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)


@pytest.mark.parametrize("choice", ["sdpa", "auto"])
def test_sdpa_and_auto_without_xformers_install_sdpa_on_every_layer(choice, no_xformers, monkeypatch):
    # auto must fall back to SDPA when xformers is missing, even where CUDA is present
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    unet = classic(tiny_unet("sd15"))
    assert configure_attention([unet], choice) == "sdpa"
    assert installed(unet) == {AttnProcessor2_0}


def test_auto_without_cuda_installs_sdpa_even_if_xformers_is_importable(fake_xformers, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    unet = classic(tiny_unet("sd15"))
    assert configure_attention([unet], "auto") == "sdpa"
    assert installed(unet) == {AttnProcessor2_0}


def test_sdpa_reaches_the_motion_modules_and_every_module_given():
    unet, motion = classic(tiny_unet("sd15")), classic(tiny_unet_motion())
    assert any("motion_modules" in name for name in motion.attn_processors)
    configure_attention([unet, motion], "sdpa")
    assert installed(unet) == installed(motion) == {AttnProcessor2_0}


def test_sdpa_output_equals_the_classic_attention_processor():
    unet = classic(tiny_unet("sd15"))
    x, t, ehs = unet_inputs()
    with torch.no_grad():
        reference = unet(x, t, ehs).sample
        configure_attention([unet], "sdpa")
        assert installed(unet) == {AttnProcessor2_0}
        out = unet(x, t, ehs).sample
    assert (reference - x).abs().max() > 1e-3  # the attention layers ran on something non-trivial
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_xformers_requested_but_not_importable_is_a_clear_error(no_xformers, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the missing package is the reason
    unet = classic(tiny_unet("sd15"))
    with pytest.raises(ValueError, match=r"xformers is not installed.*pip install"):
        configure_attention([unet], "xformers")
    assert installed(unet) == {AttnProcessor}  # nothing half-configured


def test_xformers_requested_without_cuda_says_so(fake_xformers, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_attention_backend("xformers")


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="sdpa"):
        resolve_attention_backend("flash")


@pytest.mark.skipif(
    importlib.util.find_spec("xformers") is None or not torch.cuda.is_available(),
    reason="needs xformers + CUDA",
)
def test_xformers_where_it_can_run_is_installed_and_matches_sdpa():
    unet = tiny_unet("sd15").cuda().half()
    x, t, ehs = (v.cuda() for v in unet_inputs())
    with torch.no_grad():
        configure_attention([unet], "sdpa")
        sdpa = unet(x.half(), t, ehs.half()).sample
        assert configure_attention([unet], "auto") == "xformers"
        assert installed(unet) == {XFormersAttnProcessor}
        xf = unet(x.half(), t, ehs.half()).sample
    torch.testing.assert_close(xf, sdpa, rtol=1e-2, atol=1e-2)
