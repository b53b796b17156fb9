"""Atomic writes and JSON reads that name the broken file."""

from __future__ import annotations

import pytest

from smallmighty.errors import DataError
from smallmighty.io import atomic_path, exchange_paths, read_json, restore_interrupted, write_json


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


def test_a_folder_swap_cut_between_its_renames_is_put_back(tmp_path):
    target = tmp_path / "run.checkpoint"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "state.json").write_text("1")
    target.rename(tmp_path / ".run.checkpoint.old")  # what a kill after the first rename leaves
    restore_interrupted(target)
    assert (target / "state.json").read_text() == "1"
    restore_interrupted(target)  # nothing to do when the folder is in place
    with atomic_path(target) as tmp:  # the next replacement swaps in as usual
        tmp.mkdir()
        (tmp / "state.json").write_text("2")
    assert (target / "state.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.checkpoint"]


def _killed(*args) -> None:
    raise KeyboardInterrupt("killed")


def test_a_folder_is_replaced_in_one_step_where_the_os_can_and_in_two_renames_elsewhere(tmp_path, monkeypatch):
    import smallmighty.io as io

    first, second = tmp_path / "a", tmp_path / "b"
    for folder, text in ((first, "a"), (second, "b")):
        folder.mkdir()
        (folder / "f").write_text(text)
    if not exchange_paths(first, second):
        pytest.skip("this OS or filesystem cannot exchange two paths in one step")
    assert ((first / "f").read_text(), (second / "f").read_text()) == ("b", "a")

    target = tmp_path / "model"
    for version in ("1", "2"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
            if version == "2":  # from here on a plain rename would be a kill: the swap needs none
                monkeypatch.setattr(io.os, "replace", _killed)
    monkeypatch.undo()
    assert (target / "weights").read_text() == "2"
    monkeypatch.setattr(io, "exchange_paths", lambda a, b: False)  # a system without the one-step swap
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("3")
    assert (target / "weights").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "model"]
