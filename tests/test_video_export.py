"""export_video: every accepted input format, MP4 and GIF read back with PyAV."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from perflow_video.media.video_export import export_video, export_videos, to_uint8_frames


def smooth_clip(f: int = 12, h: int = 48, w: int = 64) -> np.ndarray:
    """uint8 (F, H, W, 3): slowly drifting sinusoids, the "smooth content" a PSNR bound is fair on."""
    t = np.linspace(0, 1, f)[:, None, None]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack(
        [
            0.5 + 0.4 * np.sin(2 * np.pi * (x + 0.3 * t)),
            0.5 + 0.4 * np.cos(2 * np.pi * (y - 0.2 * t)),
            0.3 + 0.4 * (x + y) / 2 + 0 * t,
        ],
        -1,
    )
    return (img * 255).round().astype(np.uint8)


def read_back(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        return frames, float(s.average_rate), s.codec_context.name, s.codec_context.pix_fmt


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0**2 / np.mean((a.astype(float) - b.astype(float)) ** 2))


def test_mp4_is_h264_yuv420p_with_right_count_size_fps_and_fidelity(tmp_path):
    clip = smooth_clip()
    path = export_video(clip, tmp_path / "out.mp4", fps=8)
    frames, fps, codec, pix_fmt = read_back(path)
    assert frames.shape == clip.shape and (codec, pix_fmt) == ("h264", "yuv420p") and fps == pytest.approx(8)
    assert psnr(frames, clip) >= 30
    with av.open(str(path)) as c:  # +faststart: the index (moov) precedes the media data, for browsers
        data = path.read_bytes()
        assert data.find(b"moov") < data.find(b"mdat")
        assert c.streams.video[0].frames == 12


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    clip = smooth_clip(6, 45, 61)
    frames, *_ = read_back(export_video(clip, tmp_path / "odd.mp4", fps=12.5))
    assert frames.shape == (6, 46, 62, 3)
    assert psnr(frames[:, :45, :61], clip) >= 30


def test_gif_loops_with_count_size_fps_and_no_heavy_banding(tmp_path):
    clip = smooth_clip(10)
    path = export_video(clip, tmp_path / "out.gif", fps=8)
    frames, fps, codec, _ = read_back(path)
    assert codec == "gif" and frames.shape == clip.shape
    with Image.open(path) as im:
        assert im.info["loop"] == 0 and im.n_frames == 10
        durations = []
        for k in range(im.n_frames):
            im.seek(k)
            durations.append(im.info["duration"])
    assert sum(durations) == pytest.approx(10 / 8 * 1000, abs=10)  # alternating 120/130 ms averages 125
    assert fps == pytest.approx(8, rel=0.1)
    # Dithering trades per-pixel error for no visible bands: compare after a 3x3 blur (what the eye sees).
    blur = torch.nn.AvgPool2d(3, 1)

    def b(a):
        return blur(torch.from_numpy(a).permute(0, 3, 1, 2).float()).numpy()

    assert psnr(b(frames), b(clip)) >= 30 and psnr(frames, clip) >= 24


@pytest.mark.parametrize(
    "convert",
    [
        lambda c: torch.from_numpy(c).permute(0, 3, 1, 2).float() / 127.5 - 1,  # (F, C, H, W) in [-1, 1]
        lambda c: torch.from_numpy(c).permute(3, 0, 1, 2).float() / 255,  # (C, F, H, W) in [0, 1]
        lambda c: torch.from_numpy(c).permute(0, 3, 1, 2).contiguous(),  # uint8 tensor
        lambda c: c,  # uint8 numpy (F, H, W, 3)
        lambda c: c.astype(np.float32) / 255,  # diffusers "np" output
        lambda c: [Image.fromarray(f) for f in c],  # diffusers "pil" output
    ],
    ids=["fchw-pm1", "cfhw-01", "uint8-tensor", "uint8-numpy", "float-numpy", "pil-list"],
)
def test_every_documented_input_gives_the_same_frames(convert):
    clip = smooth_clip(4, 16, 24)
    np.testing.assert_allclose(to_uint8_frames(convert(clip)).astype(int), clip.astype(int), atol=1)


def test_ambiguous_layout_and_grayscale():
    clip = smooth_clip(3, 8, 8)  # F = C = 3: read as (F, C, H, W) unless told otherwise
    fchw = torch.from_numpy(clip).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(to_uint8_frames(fchw), clip)
    np.testing.assert_array_equal(to_uint8_frames(fchw.permute(1, 0, 2, 3), layout="cfhw"), clip)
    gray = torch.rand(5, 1, 8, 8)
    out = to_uint8_frames(gray)
    assert out.shape == (5, 8, 8, 3) and (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize(
    "frames, error, match",
    [
        (torch.rand(3, 8, 8), ValueError, "4-D tensor"),
        (torch.rand(2, 5, 4, 8, 8), ValueError, "export_videos"),
        (torch.rand(4, 5, 8, 8), ValueError, "channel dim"),
        (torch.rand(4, 3, 8, 8) * 255, ValueError, r"scale them to \[0, 1\]"),
        (np.zeros((4, 8, 8, 4), np.uint8), ValueError, r"\(F, H, W, 3\)"),
        (np.zeros((4, 8, 8, 3), np.int32), TypeError, "uint8 or float"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], ValueError, "differ in size"),
        (["frame.png"], TypeError, "PIL images"),
        ("clip.mp4", TypeError, "cannot export str"),
    ],
)
def test_bad_inputs_raise_clear_errors(tmp_path, frames, error, match):
    with pytest.raises(error, match=match):
        export_video(frames, tmp_path / "x.mp4")


def test_unknown_extension_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use .gif or .mp4"):
        export_video(smooth_clip(2), tmp_path / "x.avi")


def test_batch_writes_one_file_per_clip(tmp_path):
    batch = torch.from_numpy(np.stack([smooth_clip(5), 255 - smooth_clip(5)])).permute(0, 1, 4, 2, 3) / 255.0
    paths = export_videos(batch, tmp_path / "out", fps=4, ext=".gif", names=["a", "b"])
    assert [p.name for p in paths] == ["a.gif", "b.gif"]
    assert [read_back(p)[0].shape for p in paths] == [(5, 48, 64, 3)] * 2
    paths = export_videos([smooth_clip(3), smooth_clip(4)], tmp_path / "mp4s")
    assert [p.name for p in paths] == ["000.mp4", "001.mp4"] and read_back(paths[1])[0].shape[0] == 4
