"""What changes a method's ranking, as every method reports it through ``method.settings()``: its settings and
a hash of its precomputed tables. A leave-K-out result is keyed by it, so a ranking made with other settings
or other tables is never served as current."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from abu_explorer import artifacts

# settings that change how the work is cut, not the ranking
NEUTRAL = frozenset({"batch_size"})
# options added after results were filed: in the key only when switched on, so those results keep their keys
WHEN_ON = {"box_contrast": False, "box_contrast_scaled": False}


def method_settings(cfg, folder: Path | None) -> dict:
    config = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in NEUTRAL and not (k in WHEN_ON and v == WHEN_ON[k])}
    return {"config": config, "tables": artifacts.folder_hash(folder) if folder else ""}


# Defaults that a tuning replaced (docs/evaluation.md, LDS item 6). Evaluations can show a method with them as a
# row of its own, "<method>@before", so the choice is reported beside what it changed.
BEFORE_TUNING = {"abu": {"alpha": 0.01}}


def variant(row: str) -> tuple[str, dict]:
    """"abu" -> ("abu", {}); "abu@before" -> ("abu", the settings the tuning replaced)."""
    name, _, tag = row.partition("@")
    if not tag:
        return name, {}
    if tag != "before" or name not in BEFORE_TUNING:
        raise ValueError(f"unknown method variant {row!r}; variants: "
                         + ", ".join(f"{m}@before" for m in BEFORE_TUNING))
    return name, dict(BEFORE_TUNING[name])


def variant_label(row: str, name: str | None = None) -> str:
    """"abu@before" -> "abu, before tuning (alpha = 0.01)" (``name`` in place of "abu" when given); a plain row is
    its name. The one wording of a variant row, in the app's tiles and in every report."""
    base, opts = variant(row)
    name = name or base
    return name if not opts else f"{name}, before tuning (" + ", ".join(f"{k} = {v}" for k, v in opts.items()) + ")"
