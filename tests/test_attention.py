"""Attention backend choice: xformers only where it can run, PyTorch SDPA otherwise."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from perflow_video.families.attention import (
    configure_attention,
    resolve_attention_backend,
    xformers_available,
)
from perflow_video.tiny.tiny_models import tiny_unet


def test_auto_falls_back_to_sdpa_without_cuda_or_xformers():
    expected = "xformers" if xformers_available() and torch.cuda.is_available() else "sdpa"
    assert resolve_attention_backend("auto") == expected


@pytest.mark.skipif(xformers_available() and torch.cuda.is_available(), reason="xformers can run here")
def test_forcing_xformers_where_it_cannot_run_says_why():
    with pytest.raises(ValueError, match="xformers"):
        resolve_attention_backend("xformers")


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="sdpa"):
        resolve_attention_backend("flash")


def test_sdpa_is_set_on_every_attention_layer_and_output_unchanged():
    unet = tiny_unet("sd15")
    x, t, ehs = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, ehs).sample
        assert configure_attention([unet], "sdpa") == "sdpa"
        after = unet(x, t, ehs).sample
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
