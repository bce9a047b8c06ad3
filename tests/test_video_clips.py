"""VideoClipDataset: both layouts, AnimateDiff frame sampling, transforms, and bad-input handling."""

import csv
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from perflow_video.datasets.video_clips import BadDataError, VideoClipConfig, VideoClipDataset
from perflow_video.media.video_decode import decord_available, probe_video, read_frames
from perflow_video.media.video_export import encode_video, write_gif
from perflow_video.toy.toy_clips import ToyClipConfig, make_toy_clips

BACKENDS = ["pyav"] + (["decord"] if decord_available() else [])
SMALL = {"num_frames": 8, "resolution": 32, "sample_stride": 2}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """Six toy clips: 64x64, 64x128 and 128x64, 16-24 frames, CSV + sidecar captions (widths decord2 reads on
    every CPU seen: at 96 px it fails on some machines, see media/video_decode._FallbackReader)."""
    out = tmp_path_factory.mktemp("toy")
    config = ToyClipConfig(num_clips=6, sizes=((64, 64), (64, 128), (128, 64)), min_frames=16, max_frames=24)
    make_toy_clips(out, config)
    return out


def csv_config(toy_dir, **overrides) -> VideoClipConfig:
    return VideoClipConfig(csv_path=str(toy_dir / "captions.csv"), **{**SMALL, **overrides})


@pytest.mark.parametrize("backend", BACKENDS)
def test_csv_items_have_the_documented_shape_range_and_caption(toy_dir, backend):
    ds = VideoClipDataset(csv_config(toy_dir, backend=backend))
    rows = list(csv.DictReader(open(toy_dir / "captions.csv")))
    assert len(ds) == len(rows) == 6
    for i in range(len(ds)):
        item = ds[i]
        x = item["pixel_values"]
        assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
        assert -1.0 <= x.min() < -0.5 and 0.0 < x.max() <= 1.0  # dark background, bright shape
        assert item["prompt"] == rows[i]["name"]
        assert item["path"].endswith(f"{rows[i]['videoid']}.mp4")
    assert not ds.report.bad


def test_defaults_give_16_frames_at_384(toy_dir):
    ds = VideoClipDataset(VideoClipConfig(csv_path=str(toy_dir / "captions.csv")))
    assert (ds.config.num_frames, ds.config.resolution, ds.config.sample_stride) == (16, 384, 4)
    x = ds[0]["pixel_values"]
    assert x.shape == (16, 3, 384, 384) and x.dtype == torch.float32


def test_folder_layout_recurses_and_reads_sidecars(toy_dir, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, sub in enumerate(["", "a", "a/b"]):
        for ext in (".mp4", ".txt"):
            shutil.copy(toy_dir / f"toy_00{i}{ext}", tmp_path / sub / f"toy_00{i}{ext}")
    ds = VideoClipDataset(VideoClipConfig(folder=str(tmp_path), **SMALL))
    assert len(ds) == 3
    prompts = {ds[i]["prompt"] for i in range(3)}
    assert prompts == {(toy_dir / f"toy_00{i}.txt").read_text().strip() for i in range(3)}


def test_csv_without_expected_header_fails_at_construction(tmp_path):
    path = tmp_path / "webvid.csv"
    path.write_text("contentUrl,duration,page_dir,name\nhttp://x/1.mp4,PT10S,dir,a cat\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['videoid'\].*contentUrl.*video_column"):
        VideoClipDataset(VideoClipConfig(csv_path=str(path)))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        VideoClipDataset(VideoClipConfig(csv_path=str(tmp_path / "empty.csv")))


def test_csv_column_names_are_configurable(toy_dir, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("file,text\ntoy_001.mp4,a custom caption\n")
    ds = VideoClipDataset(
        VideoClipConfig(
            csv_path=str(path), video_dir=str(toy_dir), video_column="file", caption_column="text", **SMALL
        )
    )
    assert ds[0]["prompt"] == "a custom caption" and ds[0]["path"].endswith("toy_001.mp4")


def test_frame_sampling_is_animatediff_style_and_reproducible(toy_dir):
    ds = VideoClipDataset(csv_config(toy_dir, num_frames=16, sample_stride=4, seed=7))
    idx = ds.clip_indices(200, ds.rng(3))
    assert len(idx) == 16 and (np.diff(idx) == 4).all() and 0 <= idx[0] <= 200 - 61
    np.testing.assert_array_equal(idx, ds.clip_indices(200, ds.rng(3)))
    starts = {int(ds.clip_indices(200, ds.rng(i))[0]) for i in range(20)}
    assert len(starts) > 10  # random starts, not always 0
    other = VideoClipDataset(csv_config(toy_dir, num_frames=16, sample_stride=4, seed=8))
    assert [int(other.clip_indices(200, other.rng(i))[0]) for i in range(20)] != [
        int(ds.clip_indices(200, ds.rng(i))[0]) for i in range(20)
    ]
    ds.set_epoch(1)
    assert {int(ds.clip_indices(200, ds.rng(i))[0]) for i in range(20)} != starts


def test_items_match_the_sampled_source_frames(toy_dir):
    # Resolution equal to the source size: no resize, so pixels must equal the decoded frames.
    info = probe_video(toy_dir / "toy_000.mp4")
    ds = VideoClipDataset(
        csv_config(toy_dir, resolution=(info.height, info.width), num_frames=4, sample_stride=3)
    )
    item = ds[0]
    assert item["path"].endswith("toy_000.mp4")
    idx = ds.clip_indices(info.num_frames, ds.rng(0))
    expected = (
        torch.from_numpy(read_frames(item["path"], idx, backend="pyav")).permute(0, 3, 1, 2) / 127.5 - 1
    )
    torch.testing.assert_close(item["pixel_values"], expected.float())


def test_same_items_with_and_without_workers(toy_dir):
    ds = VideoClipDataset(csv_config(toy_dir, random_crop=True, random_flip=True, seed=3))
    direct = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    loader = DataLoader(ds, batch_size=3, num_workers=2)
    batched = torch.cat([b["pixel_values"] for b in loader])
    torch.testing.assert_close(direct, batched, rtol=0, atol=0)


def test_random_flip_mirrors_and_crop_moves(toy_dir):
    plain = VideoClipDataset(csv_config(toy_dir, resolution=(48, 48), seed=1))
    flipped = VideoClipDataset(csv_config(toy_dir, resolution=(48, 48), random_flip=True, seed=1))
    n_flipped = 0
    for i in range(len(plain)):
        a, b = plain[i]["pixel_values"], flipped[i]["pixel_values"]
        if not torch.equal(a, b):
            torch.testing.assert_close(b, a.flip(-1))
            n_flipped += 1
    assert 0 < n_flipped < len(plain)
    cropped = VideoClipDataset(csv_config(toy_dir, resolution=(48, 48), random_crop=True))
    assert any(
        not torch.equal(plain[i]["pixel_values"], cropped[i]["pixel_values"]) for i in range(len(plain))
    )


@pytest.mark.parametrize("size", [(80, 48), (48, 96), (45, 61)], ids=["portrait", "landscape", "odd"])
def test_any_source_shape_gives_the_requested_resolution(tmp_path, size):
    h, w = size
    frames = np.random.default_rng(0).integers(0, 255, (12, h, w, 3), dtype=np.uint8)
    ext, codec, pix = (".mkv", "ffv1", "yuv444p") if h % 2 else (".mp4", "libx264", "yuv420p")
    encode_video(frames, tmp_path / f"v{ext}", fps=4, codec=codec, pix_fmt=pix)
    (tmp_path / "v.txt").write_text("noise")
    ds = VideoClipDataset(
        VideoClipConfig(folder=str(tmp_path), num_frames=4, resolution=(24, 40), sample_stride=2)
    )
    assert ds[0]["pixel_values"].shape == (4, 3, 24, 40)


def test_short_clip_policies(toy_dir):
    def indices(policy, n):
        ds = VideoClipDataset(csv_config(toy_dir, num_frames=8, sample_stride=4, short_clip_policy=policy))
        return ds.clip_indices(n, ds.rng(0), "short.mp4")

    low = indices("lower_stride", 20)  # needs 29 frames at stride 4: stride 2 fits (15 frames)
    assert (np.diff(low) == 2).all() and low.max() < 20
    assert (np.diff(indices("lower_stride", 8)) == 1).all()
    looped = indices("loop", 10)
    assert looped.max() < 10 and len(looped) == 8 and ((np.diff(looped) % 10) == 4).all()
    for policy, n in [("skip", 20), ("lower_stride", 7)]:
        with pytest.raises(Exception, match="too_short"):
            indices(policy, n)


@pytest.fixture()
def mixed_folder(toy_dir, tmp_path):
    """Four good clips (mp4, gif, avi, over-reporting avi) and six bad items, with sidecar captions."""
    good = [toy_dir / f"toy_00{i}.mp4" for i in range(2)]
    for p in good:
        shutil.copy(p, tmp_path / p.name)
    frames = read_frames(good[0], list(range(16)), backend="pyav")
    write_gif(frames, tmp_path / "anim.gif", fps=8)
    encode_video(frames, tmp_path / "old.avi", fps=8, codec="mjpeg", pix_fmt="yuvj420p")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mkv").write_bytes(np.random.default_rng(0).bytes(3000))
    data = good[1].read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])  # header survives, 1 frame left
    encode_video(frames[:3], tmp_path / "short.mp4", fps=8)
    shutil.copy(good[0], tmp_path / "nocaption.mp4")
    shutil.copy(good[0], tmp_path / "blank.mp4")
    for p in tmp_path.iterdir():
        if p.suffix != ".txt" and p.stem != "nocaption":
            p.with_suffix(".txt").write_text("" if p.stem == "blank" else f"clip {p.stem}")
    return tmp_path


EXPECTED_BAD = {
    "empty.mp4": "empty_file",
    "garbage.mkv": "unreadable",
    "truncated.mp4": "too_short",
    "short.mp4": "too_short",
    "nocaption.mp4": "missing_caption",
    "blank.mp4": "empty_caption",
}


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_mixed_folder_loads_and_reports_what_was_skipped(mixed_folder, backend):
    ds = VideoClipDataset(
        VideoClipConfig(folder=str(mixed_folder), backend=backend, max_bad_fraction=0.7, **SMALL)
    )
    assert len(ds) == 10
    names = [ds[i]["path"].split("/")[-1] for i in range(len(ds))]
    assert set(names) == {"toy_000.mp4", "toy_001.mp4", "anim.gif", "old.avi"}
    got = {path.split("/")[-1]: reason for reason, path, _ in ds.report.bad.values()}
    assert got == EXPECTED_BAD
    assert ds.report.counts["too_short"] == 2
    summary = ds.report.summary()
    assert "skipped 6 of 10" in summary and "garbage.mkv" in summary and "empty_caption" in summary


def test_validate_reports_up_front_and_enforces_the_limit(mixed_folder):
    ds = VideoClipDataset(VideoClipConfig(folder=str(mixed_folder), max_bad_fraction=0.7, **SMALL))
    report = ds.validate()
    assert {p.split("/")[-1] for _, p, _ in report.bad.values()} == set(EXPECTED_BAD)
    assert all(ds[i]["path"].split("/")[-1] not in EXPECTED_BAD for i in range(len(ds)))
    good = [ds[i]["path"].split("/")[-1] for i in ds.good_indices()]
    assert sorted(good) == ["anim.gif", "old.avi", "toy_000.mp4", "toy_001.mp4"]
    strict = VideoClipDataset(VideoClipConfig(folder=str(mixed_folder), max_bad_fraction=0.2, **SMALL))
    with pytest.raises(BadDataError, match=r"(?s)more than 20\.0%.*skipped 6 of 10.*e\.g\."):
        strict.validate(decode=False)


def test_too_many_bad_items_stop_iteration_with_examples(mixed_folder):
    ds = VideoClipDataset(VideoClipConfig(folder=str(mixed_folder), max_bad_fraction=0.15, **SMALL))
    loader = DataLoader(ds, batch_size=2, num_workers=0)
    with pytest.raises(BadDataError, match="unusable"):
        for _ in loader:
            pass


def test_undecodable_packets_are_resampled_within_decodable_frames(toy_dir, tmp_path):
    import av

    src = tmp_path / "src.mp4"
    frames = read_frames(toy_dir / "toy_000.mp4", list(range(16)), backend="pyav")
    encode_video(frames, src, fps=8, codec_options={"g": "4"})  # keyframes at 0, 4, 8, 12
    out = tmp_path / "headless.mp4"
    with av.open(str(src)) as inp, av.open(str(out), "w") as dst:
        stream = dst.add_stream_from_template(inp.streams.video[0])
        for p in [p for p in inp.demux(inp.streams.video[0]) if p.size][1:]:  # drop the keyframe
            p.stream = stream
            dst.mux(p)
    out.with_suffix(".txt").write_text("a clip without its first keyframe")
    src.unlink()
    ds = VideoClipDataset(
        VideoClipConfig(folder=str(tmp_path), backend="pyav", num_frames=4, sample_stride=4, resolution=32)
    )
    item = ds[0]  # 15 packets, 12 decodable: every start (0..2) hits the undecodable head
    assert item["pixel_values"].shape == (4, 3, 32, 32) and not ds.report.bad
    assert any("do not decode" in k for k in ds.report.notes)
