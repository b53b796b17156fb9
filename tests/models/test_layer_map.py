"""Layer maps for distillation and the teacher blocks that seed a shrunk student."""

from __future__ import annotations

import pytest

from smallmighty.errors import SlmError
from smallmighty.models.layer_map import (
    every_kth_layer,
    parse_layer_map,
    uniform_layer_map,
)


@pytest.mark.parametrize("n_student, n_teacher, expected", [
    (4, 12, [(1, 3), (2, 6), (3, 9), (4, 12)]),
    (3, 6, [(1, 2), (2, 4), (3, 6)]),
    (2, 6, [(1, 3), (2, 6)]),
    (5, 12, [(1, 3), (2, 5), (3, 8), (4, 10), (5, 12)]),  # 12/5 = 2.4: ceil of 2.4, 4.8, 7.2, 9.6, 12
    (1, 6, [(1, 6)]),
    (6, 6, [(i, i) for i in range(1, 7)]),
])
def test_uniform_layer_map(n_student, n_teacher, expected):
    assert uniform_layer_map(n_student, n_teacher) == expected


def test_uniform_layer_map_with_embeddings_adds_zero_pair_first():
    assert uniform_layer_map(2, 6, include_embeddings=True) == [(0, 0), (1, 3), (2, 6)]


@pytest.mark.parametrize("n_student, n_teacher", [(0, 6), (7, 6)])
def test_uniform_layer_map_rejects_impossible_depths(n_student, n_teacher):
    with pytest.raises(SlmError, match="layer"):
        uniform_layer_map(n_student, n_teacher)


@pytest.mark.parametrize("n_teacher, n_student, expected", [
    (6, 3, [1, 3, 5]),
    (6, 2, [2, 5]),
    (12, 4, [2, 5, 8, 11]),
    (6, 1, [5]),
    (4, 4, [0, 1, 2, 3]),
])
def test_every_kth_layer(n_teacher, n_student, expected):
    assert every_kth_layer(n_teacher, n_student) == expected


def test_every_kth_layer_rejects_bigger_or_empty_student():
    with pytest.raises(SlmError, match="more layers"):
        every_kth_layer(6, 7)
    with pytest.raises(SlmError, match="at least 1"):
        every_kth_layer(6, 0)


def test_parse_layer_map_pairs_and_uniform():
    assert parse_layer_map("1:2,2:4,3:6", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert parse_layer_map(" 0:0 , 2 : 6 ", 2, 6) == [(0, 0), (2, 6)]
    assert parse_layer_map("2:6,1:3", 2, 6) == [(1, 3), (2, 6)]  # sorted by student layer
    assert parse_layer_map("uniform", 4, 12) == uniform_layer_map(4, 12)
    assert parse_layer_map(" Uniform ", 2, 6) == [(1, 3), (2, 6)]


@pytest.mark.parametrize("spec, message", [
    ("1-2", "'1-2' is not 'student:teacher'"),
    ("1:2,,2:4", "'' is not 'student:teacher'"),
    ("1:2:3", "'1:2:3' is not"),
    ("a:2", "'a:2' is not"),
    ("", "empty"),
    ("4:6", r"'4:6': student layer 4 is outside 0\.\.3"),
    ("1:7", r"'1:7': teacher layer 7 is outside 0\.\.6"),
    ("-1:2", "student layer -1 is outside"),
    ("1:2,1:4", "'1:4': student layer 1 is already mapped by '1:2'"),
    ("1:4,2:4", "'2:4': teacher layers must increase"),
    ("1:4,2:2", "'2:2': teacher layers must increase"),
])
def test_parse_layer_map_errors_name_the_bad_piece(spec, message):
    with pytest.raises(SlmError, match=message):
        parse_layer_map(spec, 3, 6)
