"""The model families this toolkit trains, named once (the schema's choice and every registry use it)."""

from __future__ import annotations

from typing import Literal, get_args

FamilyName = Literal["animatediff", "sd15", "sd21", "sdxl"]
FAMILY_NAMES: tuple[str, ...] = get_args(FamilyName)
