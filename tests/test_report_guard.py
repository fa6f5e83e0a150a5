"""A report folder holds one table: what stops a run of another one, and what it names."""
import json

import pytest

from abu_explorer.evaluation import report_guard

IDENT = {"methods": ["abu", "pixel"], "protocol": "p1", "machine_kind": "k", "split": "test"}


def test_another_table_stops_with_what_differs_and_force_lets_it_through(tmp_path):
    path = tmp_path / "x_summary.json"
    report_guard.claim(path, IDENT)  # no report yet
    path.write_text(json.dumps({"table": IDENT, "methods": {}}))
    report_guard.claim(path, dict(IDENT))  # the same table
    with pytest.raises(FileExistsError, match=r"\(split 'test' there, 'tune' here\); pass --assets DIR"):
        report_guard.claim(path, {**IDENT, "split": "tune"})
    with pytest.raises(FileExistsError, match=r"methods \['abu', 'pixel'\] there, \['abu'\] here"):
        report_guard.claim(path, {**IDENT, "methods": ["abu"]})
    report_guard.claim(path, {**IDENT, "split": "tune"}, force=True)


def test_a_report_written_before_tables_were_named_counts_when_its_records_agree(tmp_path):
    path = tmp_path / "x_summary.json"
    path.write_text(json.dumps({"methods": {"pixel": {}, "abu": {}}, "protocol": "p1", "machine_kind": "k"}))
    report_guard.claim(path, IDENT)  # same methods (any order), protocol and machine kind
    for other in ({"methods": ["abu"]}, {"protocol": "p2"}, {"machine_kind": "k2"}):
        with pytest.raises(FileExistsError, match="written before reports named their table"):
            report_guard.claim(path, {**IDENT, **other})
