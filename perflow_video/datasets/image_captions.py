"""Captioned images for the image models (SD 1.5 / 2.1 / XL), with the video dataset's bad-input rules.

Layouts: a folder of images with sidecar captions (``cat.png`` + ``cat.txt``, recursive), or a CSV
with an image path column and a caption column (paths relative to ``image_dir``, default the CSV's
folder). A bad item (unreadable, truncated or empty image, missing or empty caption) is recorded in
``report`` and the next loadable item is returned instead; see :mod:`perflow_video.datasets.video_clips`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from perflow_video.datasets.video_clips import (
    BadItemError,
    CaptionedDataset,
    CaptionedFile,
    SkipReport,
    output_size,
    read_caption,
    read_csv_rows,
    resize_center_crop,
    scan_captioned_folder,
)
from perflow_video.errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable"


@dataclass
class ImageCaptionConfig:
    """Where the images are and how to turn them into training tensors."""

    csv_path: str | None = None  # CSV with one row per image (give this or `folder`)
    folder: str | None = None  # folder of images + sidecar captions, searched recursively
    image_dir: str | None = None  # base for relative CSV paths; default: the CSV's own folder
    image_column: str = "path"  # CSV column with the image path
    caption_column: str = "caption"  # CSV column with the caption
    caption_ext: str = ".txt"  # sidecar caption suffix in folder mode
    resolution: int | tuple[int, int] = 512  # output (H, W); an int means square
    random_crop: bool = False  # random instead of center crop after the resize
    random_flip: bool = False  # horizontal flip with p=0.5
    seed: int = 0  # crops and flips derive from (seed, epoch, index)
    max_bad_fraction: float = 0.05  # stop with BadDataError when more of the dataset is unusable
    allow_empty_prompt: bool = False  # accept empty captions (unconditional training)


def load_rgb(path: str) -> np.ndarray:
    """Reads an image as uint8 RGB ``(H, W, 3)``, upright (EXIF), transparency composited on white.

    Raises:
        BadItemError: Missing, empty, unreadable or truncated file.
    """
    if not os.path.isfile(path):
        raise BadItemError(path, MISSING_FILE, "no such file")
    if os.path.getsize(path) == 0:
        raise BadItemError(path, EMPTY_FILE, "file is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise BadItemError(path, UNREADABLE, f"PIL cannot decode it ({e})") from e


class ImageCaptionDataset(CaptionedDataset):
    """Images with captions; items are ``{"pixel_values", "prompt", "path"}``.

    ``pixel_values`` is float32 ``(C, H, W)`` in ``[-1, 1]``, resized so the image covers the
    resolution, then center- (or randomly) cropped.
    """

    def __init__(self, config: ImageCaptionConfig):
        c = config
        if (c.csv_path is None) == (c.folder is None):
            raise ValueError("ImageCaptionConfig: give exactly one of csv_path or folder")
        self.config = c
        self.size = output_size(c.resolution)
        super().__init__(
            self._load_csv(c) if c.csv_path is not None else self._scan_folder(c), c.max_bad_fraction
        )

    @staticmethod
    def _load_csv(c: ImageCaptionConfig) -> list[CaptionedFile]:
        hint = (
            f"Set ImageCaptionConfig.image_column (now {c.image_column!r}) and caption_column "
            f"(now {c.caption_column!r}) to match your CSV."
        )
        rows = read_csv_rows(c.csv_path, [c.image_column, c.caption_column], hint)
        base = c.image_dir or os.path.dirname(os.path.abspath(c.csv_path))
        entries = [
            CaptionedFile(
                os.path.join(base, (r.get(c.image_column) or "").strip()), r.get(c.caption_column) or "", None
            )
            for r in rows
        ]
        if not entries:
            raise ConfigError(f"{c.csv_path}: the CSV has a header but no rows")
        return entries

    @staticmethod
    def _scan_folder(c: ImageCaptionConfig) -> list[CaptionedFile]:
        return scan_captioned_folder(c.folder, IMAGE_EXTENSIONS, c.caption_ext, "image")

    def _load(self, index: int) -> dict:
        entry = self.entries[index]
        prompt = read_caption(entry, self.config.allow_empty_prompt)
        image = load_rgb(entry.path)
        rng = np.random.default_rng([self.config.seed, self.epoch, index])
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        flip = self.config.random_flip and bool(rng.random() < 0.5)
        x = resize_center_crop(x, self.size, rng if self.config.random_crop else None, flip)[0]
        return {"pixel_values": x, "prompt": prompt, "path": entry.path}

    def validate(self) -> SkipReport:
        """Decodes every image and caption up front; bad ones are then skipped without retrying.

        Raises:
            BadDataError: The bad fraction exceeds ``max_bad_fraction``; the message lists examples.
        """

        def check(i: int) -> None:
            read_caption(self.entries[i], self.config.allow_empty_prompt)
            load_rgb(self.entries[i].path)

        return self._scan(check)
