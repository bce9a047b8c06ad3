"""ImageCaptionDataset: folder and CSV layouts, resize + crop, and the bad-input rules."""

import numpy as np
import pytest
import torch
from PIL import Image

from perflow_video.datasets.image_captions import ImageCaptionConfig, ImageCaptionDataset
from perflow_video.datasets.video_clips import BadDataError


def gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1).astype(
        np.uint8
    )


@pytest.fixture()
def image_folder(tmp_path):
    """Good: landscape PNG, portrait JPEG, odd-size RGBA PNG, grayscale in a sub-folder. Bad: four."""
    (tmp_path / "sub").mkdir()
    Image.fromarray(gradient(40, 64)).save(tmp_path / "wide.png")
    Image.fromarray(gradient(70, 30)).save(tmp_path / "tall.jpg", quality=95)
    rgba = np.dstack([gradient(33, 35), np.full((33, 35), 0, np.uint8)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "odd.png")
    Image.fromarray(gradient(50, 50)[..., 0]).save(tmp_path / "sub" / "gray.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    data = (tmp_path / "tall.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.fromarray(gradient(20, 20)).save(tmp_path / "nocaption.png")
    for p in list(tmp_path.rglob("*.*")):
        if p.stem != "nocaption":
            p.with_suffix(".txt").write_text(f"an image called {p.stem}")
    return tmp_path


def test_folder_items_shape_range_and_report(image_folder):
    ds = ImageCaptionDataset(
        ImageCaptionConfig(folder=str(image_folder), resolution=32, max_bad_fraction=0.6)
    )
    assert len(ds) == 8
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        x = item["pixel_values"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        assert item["prompt"].startswith("an image called")
        seen.add(item["path"].split("/")[-1])
    assert seen == {"wide.png", "tall.jpg", "odd.png", "gray.png"}
    reasons = {p.split("/")[-1]: r for r, p, _ in ds.report.bad.values()}
    assert reasons == {
        "empty.png": "empty_file",
        "garbage.jpg": "unreadable",
        "truncated.jpg": "unreadable",
        "nocaption.png": "missing_caption",
    }


def test_transparency_is_composited_on_white_and_gray_becomes_rgb(image_folder):
    ds = ImageCaptionDataset(
        ImageCaptionConfig(folder=str(image_folder), resolution=16, max_bad_fraction=0.6)
    )
    items = {ds[i]["path"].split("/")[-1]: ds[i]["pixel_values"] for i in range(len(ds))}
    torch.testing.assert_close(items["odd.png"], torch.ones(3, 16, 16))
    gray = items["gray.png"]
    torch.testing.assert_close(gray[0], gray[1])
    torch.testing.assert_close(gray[1], gray[2])


def test_center_crop_keeps_the_middle(tmp_path):
    img = gradient(40, 80)  # landscape: the crop drops 20 columns each side at full scale
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a gradient")
    x = ImageCaptionDataset(ImageCaptionConfig(folder=str(tmp_path), resolution=40))[0]["pixel_values"]
    expected = torch.from_numpy(img[:, 20:60]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, expected)


def test_csv_layout_and_header_check(image_folder, tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_text(f"path,caption\n{image_folder}/wide.png,a wide one\nsub/gray.png,a gray one\n")
    ds = ImageCaptionDataset(
        ImageCaptionConfig(csv_path=str(csv), image_dir=str(image_folder), resolution=24)
    )
    assert [ds[i]["prompt"] for i in range(2)] == ["a wide one", "a gray one"]
    assert ds[1]["pixel_values"].shape == (3, 24, 24)
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,text\nwide.png,x\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['path', 'caption'\].*file_name"):
        ImageCaptionDataset(ImageCaptionConfig(csv_path=str(bad)))
    custom = ImageCaptionConfig(
        csv_path=str(bad), image_dir=str(image_folder), image_column="file_name", caption_column="text"
    )
    assert ImageCaptionDataset(custom)[0]["prompt"] == "x"


def test_validate_raises_past_the_limit_with_examples(image_folder):
    ds = ImageCaptionDataset(ImageCaptionConfig(folder=str(image_folder), max_bad_fraction=0.25))
    with pytest.raises(BadDataError, match=r"(?s)skipped 4 of 8.*truncated\.jpg"):
        ds.validate()


def test_random_crop_and_flip_are_seeded(image_folder):
    def load(seed):
        cfg = ImageCaptionConfig(
            folder=str(image_folder),
            resolution=24,
            random_crop=True,
            random_flip=True,
            seed=seed,
            max_bad_fraction=1,
        )
        return ImageCaptionDataset(cfg)[7]["pixel_values"]  # wide.png

    torch.testing.assert_close(load(5), load(5))
    assert any(not torch.equal(load(5), load(s)) for s in range(6, 10))
