"""What changes a method's ranking, as every method reports it through ``method.settings()``: its settings and
a hash of its precomputed tables. A leave-K-out result is keyed by it, so a ranking made with other settings
or other tables is never served as current."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from abu_explorer import artifacts

# settings that change how the work is cut, not the ranking
NEUTRAL = frozenset({"batch_size"})


def method_settings(cfg, folder: Path | None) -> dict:
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NEUTRAL}
    return {"config": config, "tables": artifacts.folder_hash(folder) if folder else ""}
