"""Optional precomputed latents and text embeddings (``data.cache_latents``): the VAE and the text
encoders run once over the data, not on every step.

Each dataset item becomes ``<cache_dir>/<index>.safetensors`` (latents of epoch 0's frames/crop and the
per-prompt text conditioning), written atomically; ``complete.json`` records what the cache was built
from, so a later run with the same data and model reuses it and a different one rebuilds it. Every
process builds its share (index % num_processes). Trade-off: the random frame start / crop of epoch 0
is reused in every epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from perflow_video.atomic_files import atomic_destination, write_safetensors_atomic
from perflow_video.families import FamilyModels, ModelFamily
from perflow_video.method.teacher_solver import Conditioning

MARKER = "complete.json"
_EHS, _ADDED = "text.encoder_hidden_states", "text.added."


def conditioning_to_tensors(cond: Conditioning, row: int) -> dict[str, Tensor]:
    """Row ``row`` of a per-prompt conditioning as flat named tensors (what a cache file stores)."""
    out = {_EHS: cond.encoder_hidden_states[row]}
    for key, value in (cond.added_cond_kwargs or {}).items():
        out[_ADDED + key] = value[row]
    return out


def conditioning_from_batch(batch: dict, device) -> Conditioning:
    """The inverse for a collated batch: (B, ...) tensors back into a Conditioning."""
    added = {k[len(_ADDED) :]: v.to(device) for k, v in batch.items() if k.startswith(_ADDED)}
    return Conditioning(batch[_EHS].to(device), added or None)


@torch.no_grad()
def build_latent_cache(
    dataset: Dataset,
    family: ModelFamily,
    models: FamilyModels,
    cache_dir: Path,
    fingerprint: dict,
    process_index: int,
    num_processes: int,
    device,
    batch_size: int = 8,
) -> bool:
    """Encode this process's share of the dataset into ``cache_dir``; returns False if it was up to date.

    The caller waits for every process, then calls :func:`mark_complete` on the main process.
    """
    marker = cache_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == fingerprint:
        return False
    cache_dir.mkdir(parents=True, exist_ok=True)
    mine = list(range(process_index, len(dataset), num_processes))
    for start in tqdm(range(0, len(mine), batch_size), desc="caching latents", disable=process_index != 0):
        indices = mine[start : start + batch_size]
        items = [dataset[i] for i in indices]
        pixels = torch.stack([item["pixel_values"] for item in items]).to(device)
        latents = family.encode_pixels(models, pixels).float().cpu()
        text = family.encode_text(models, [item["prompt"] for item in items], device).map(
            lambda x: x.float().cpu()
        )
        for row, (index, item) in enumerate(zip(indices, items, strict=True)):
            tensors = {"latents": latents[row], **conditioning_to_tensors(text, row)}
            meta = {"prompt": item["prompt"], "path": str(item.get("path", ""))}
            write_safetensors_atomic(tensors, cache_dir / f"{index:08d}.safetensors", meta)
    return True


def mark_complete(cache_dir: Path, fingerprint: dict) -> None:
    """Record what the cache was built from (main process, after every process finished)."""
    with atomic_destination(cache_dir / MARKER) as tmp, open(tmp, "w") as f:
        json.dump(fingerprint, f)


class CachedLatentDataset(Dataset):
    """Items ``{"latents", "text.*", "prompt", "index"}`` read from a built cache."""

    def __init__(self, cache_dir: Path, length: int):
        self.cache_dir, self.length = Path(cache_dir), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        path = self.cache_dir / f"{index:08d}.safetensors"
        item: dict = load_file(str(path))

        with safe_open(str(path), "pt") as f:
            item["prompt"] = f.metadata()["prompt"]
        item["index"] = index
        return item
