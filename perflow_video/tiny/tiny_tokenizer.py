"""The project's tiny CLIP tokenizer: a real ``transformers.CLIPTokenizer`` over a few hundred words.

Laid out like ``openai/clip-vit-large-patch14`` (byte-level BPE, CLIP's 77-token context, ``<|startoftext|>`` /
``<|endoftext|>``, padding with ``<|endoftext|>``), with merges learned so that every word of
:data:`TINY_WORDS` (colours, shapes, motions and common prompt words) is one token; anything else still
encodes, byte by byte. The files live in ``perflow_video/tiny/assets/tiny_clip_tokenizer``; run
``python -m perflow_video.tiny.tiny_tokenizer`` to regenerate them (deterministic; a test checks they are
up to date).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

__all__ = ["TINY_TOKENIZER_DIR", "TINY_WORDS", "tiny_tokenizer", "write_tiny_tokenizer_files"]

TINY_TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "assets" / "tiny_clip_tokenizer"


_WORD_GROUPS: dict[str, str] = {
    "colors": "red green blue yellow white black orange purple pink cyan magenta gray grey brown violet gold "
    "silver colorful",
    "shapes and objects": "circle circles square squares triangle triangles ball balls box boxes star stars "
    "ring rings dot dots disk cube sphere rectangle line lines cross heart diamond blob shape shapes object "
    "objects stripe stripes pattern cat dog bird fish car tree flower person sun moon",
    "directions and motions": "moving moves move motion left right up down upward downward diagonally "
    "diagonal bouncing bounces spinning spins rotating turning growing shrinking still static slowly slow "
    "quickly quick fast across around toward towards back forth falling rising sliding drifting orbiting "
    "zooming pulsing flying walking running jumping floating camera pan zoom",
    "generic": "a an the on in of and with at over under to from is it its video photo clip image frame "
    "scene background foreground dark light bright small large big tiny huge one two three sky sea water "
    "grass field street room night day",
    "prompt quality words": "high low quality best worst detailed blurry bad ugly text watermark realistic "
    "cartoon simple masterpiece",
}
#: Words that are single tokens of the tiny tokenizer (anything else is still encodable, byte by byte).
TINY_WORDS: tuple[str, ...] = tuple(w for group in _WORD_GROUPS.values() for w in group.split())

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _learn_bpe_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Classic (Sennrich) BPE on a word list until every word is a single symbol.

    Each word counts once; the most frequent adjacent pair is merged first, ties broken by the pair's
    lexicographic order, so the result is deterministic. Because encoding applies merges in the same rank
    order, every training word encodes to exactly one ``word</w>`` token.
    """
    byte_char = _bytes_to_unicode()
    seqs = []
    for word in sorted(set(words)):
        chars = [byte_char[b] for b in word.encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + "</w>"])
    merges: list[tuple[str, str]] = []
    while True:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for seq in seqs:
            counts.update(zip(seq, seq[1:], strict=False))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out


def write_tiny_tokenizer_files(
    folder: str | Path = TINY_TOKENIZER_DIR, words: Iterable[str] = TINY_WORDS
) -> Path:
    """Write the files of the tiny CLIP tokenizer (same layout as ``openai/clip-vit-large-patch14``).

    The vocabulary is laid out like CLIP's: the 256 byte-level symbols, the same 256 with ``</w>``, one token
    per BPE merge, then ``<|startoftext|>`` and ``<|endoftext|>`` last.

    Args:
        folder: Output folder (created if needed). Defaults to the bundled asset folder.
        words: Words that must become single tokens.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    merges = _learn_bpe_merges(words)
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [_BOS, _EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:  # two merges can spell the same string; keep ids contiguous
        vocab.setdefault(tok, len(vocab))

    def dump(name: str, obj: dict) -> None:
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    dump("vocab.json", vocab)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
    dump("special_tokens_map.json", special)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,  # CLIP's context length, as in every SD tokenizer
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
    }
    dump("tokenizer_config.json", config)
    return folder


def tiny_tokenizer() -> CLIPTokenizer:
    """Load the bundled tiny CLIP tokenizer (about 900 tokens, ``model_max_length`` 77, pads with EOS).

    Returns:
        A ``transformers.CLIPTokenizer`` loaded from ``perflow_video/tiny/assets/tiny_clip_tokenizer``.
    """
    return CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))


if __name__ == "__main__":
    print(f"wrote {write_tiny_tokenizer_files()}")
