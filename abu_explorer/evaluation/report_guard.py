"""A report folder holds one table per report: a run of another table (another split, other methods or
settings) stops before any work instead of overwriting it, unless forced."""
from __future__ import annotations

from pathlib import Path

from abu_explorer import artifacts


def claim(summary: Path, ident: dict, force: bool = False) -> None:
    """Raise FileExistsError, naming what differs, when ``summary`` reports another table than ``ident`` (the
    table's identity, saved as the summary's ``table``; ``_legacy_match`` for a summary without one) and not
    ``force``."""
    summary = Path(summary)
    if force or not summary.exists():
        return
    doc = artifacts.load_json(summary)
    old = doc.get("table")
    if old == ident or (old is None and _legacy_match(doc, ident)):
        return
    what = ("written before reports named their table" if not isinstance(old, dict) else
            "; ".join(f"{k} {old.get(k)!r} there, {ident.get(k)!r} here" for k in sorted({*old, *ident})
                      if old.get(k) != ident.get(k)))
    raise FileExistsError(f"{summary} reports another table ({what}); pass --assets DIR for this one, "
                          "or --force to replace it")


def _legacy_match(doc: dict, ident: dict) -> bool:
    """A report written before reports named their table is taken as this one when what it records agrees: the
    same methods, and the same machine kind and protocol where it names them."""
    return set(doc.get("methods") or ()) == set(ident.get("methods", ())) and all(
        doc[k] == ident[k] for k in ("machine_kind", "protocol") if k in doc and k in ident)
