"""``--help-config``: every config field with the value a run would use and its one-line meaning.

The meaning is the string in the field's annotation (``x: Annotated[int, "meaning"] = 1``); the choices
of a ``Literal`` field come from the type itself, so neither is written twice.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from perflow_video.training.config_io import to_dict


def field_meanings(cls: type) -> dict[str, str]:
    """{field name: its meaning} of a dataclass; "" where the annotation carries none."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: _meaning(hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _meaning(annotation: Any) -> str:
    extras = getattr(annotation, "__metadata__", ())
    return next((m for m in extras if isinstance(m, str)), "")


def field_choices(cls: type) -> dict[str, tuple]:
    """{field name: the values of its ``Literal``} for the choice fields of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {name: typing.get_args(tp) for name, tp in hints.items() if typing.get_origin(tp) is Literal}


def config_reference(config: Any) -> str:
    """One line per field of a config of sections: ``section.key = value  # meaning [choice | ...]``.

    Args:
        config: a resolved config instance (e.g. ``TrainConfig``); its values are the ones shown.
    """
    lines = []
    for section, values in to_dict(config).items():
        cls = type(getattr(config, section))
        meanings, choices = field_meanings(cls), field_choices(cls)
        lines.append(f"{section}:")
        for name, value in values.items():
            note = meanings[name] + (f" [{' | '.join(map(str, choices[name]))}]" if name in choices else "")
            lines.append(f"  {section}.{name} = {json.dumps(value, ensure_ascii=False)}  # {note}")
    return "\n".join(lines)
