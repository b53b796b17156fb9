"""Atomic writes and JSON reads that name the broken file."""

from __future__ import annotations

import pytest

from smallmighty.errors import DataError
from smallmighty.io import atomic_path, read_json, write_json


def test_json_round_trip_and_optional_default(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    assert read_json(tmp_path / "absent.json", default={}) == {}
    with pytest.raises(DataError, match="absent.json.*file not found"):
        read_json(tmp_path / "absent.json")


def test_broken_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(DataError, match=r"config.json, line 4: not valid JSON"):
        read_json(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(DataError, match="config.json.*not UTF-8"):
        read_json(path)


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind
