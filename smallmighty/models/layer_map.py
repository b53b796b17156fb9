"""Which student layer learns from which teacher layer, and which teacher blocks seed a shrunk student.

Layers are numbered as hidden-state outputs: layer 0 is the embedding output and layer i (i >= 1) is
the output of transformer block i, the numbering of `output_hidden_states=True` in transformers.
Teacher *blocks*, as copied by `every_kth_layer`, are 0-based module indices: block b outputs layer b + 1.

Both maps spread the student evenly over the teacher and always end on the teacher's last layer,
because the last layer is the one the task head reads, so it is the one the student must match most.
"""

from __future__ import annotations

from smallmighty.errors import SlmError


def _check_depths(n_student: int, n_teacher: int) -> None:
    """Reject depths for which an even, strictly increasing spread does not exist."""
    if n_student < 1:
        raise SlmError(f"the student needs at least 1 layer, got {n_student}")
    if n_student > n_teacher:
        raise SlmError(f"the student has more layers ({n_student}) than the teacher ({n_teacher}); "
                       "each student layer needs its own teacher layer")


def _spread(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer ceil(i * n_teacher / n_student) for student layer i = 1..n_student.

    Rounding up (rather than to nearest) makes the last student layer land exactly on the last
    teacher layer and keeps the spacing as even as integers allow.
    """
    _check_depths(n_student, n_teacher)
    return [(i * n_teacher + n_student - 1) // n_student for i in range(1, n_student + 1)]


def uniform_layer_map(n_student: int, n_teacher: int, *,
                      include_embeddings: bool = False) -> list[tuple[int, int]]:
    """Map student layer i to teacher layer ceil(i * n_teacher / n_student), e.g. 4->12: 3, 6, 9, 12.

    `include_embeddings=True` also pairs the two embedding outputs as (0, 0), for TinyBERT's
    embedding-layer loss; it is opt-in because that loss only makes sense for a recipe that trains
    the student's embeddings against the teacher's.
    """
    pairs = list(enumerate(_spread(n_student, n_teacher), start=1))
    return [(0, 0), *pairs] if include_embeddings else pairs


def every_kth_layer(n_teacher: int, n_student: int) -> list[int]:
    """The 0-based teacher blocks to copy into an `n_student`-block student, last block always kept.

    These are exactly the blocks whose outputs `uniform_layer_map` pairs with the student, so a
    student initialised from them starts out already close to its distillation targets
    (6->3: [1, 3, 5]; 12->4: [2, 5, 8, 11]).
    """
    return [layer - 1 for layer in _spread(n_student, n_teacher)]


def _parse_pair(piece: str, n_student: int, n_teacher: int) -> tuple[int, int]:
    """One "student:teacher" piece, range-checked against both depths."""
    parts = piece.split(":")
    try:
        student, teacher = (int(p.strip()) for p in parts)
    except ValueError:
        raise SlmError(f"layer map piece '{piece}' is not 'student:teacher' "
                       "with two whole numbers") from None
    if not 0 <= student <= n_student:
        raise SlmError(f"layer map piece '{piece}': student layer {student} is outside 0..{n_student}")
    if not 0 <= teacher <= n_teacher:
        raise SlmError(f"layer map piece '{piece}': teacher layer {teacher} is outside 0..{n_teacher}")
    return student, teacher


def parse_layer_map(spec: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Read a layer map from "uniform" or "s:t,s:t,..." (e.g. "1:2,2:4,3:6"), sorted by student layer.

    Each student layer may appear once, and teacher layers must rise with student layers: a
    deeper student layer copying a shallower (or the same) teacher layer would fight the layers
    above it, so such a map is almost certainly a typo.
    """
    if spec.strip().lower() == "uniform":
        return uniform_layer_map(n_student, n_teacher)
    if not spec.strip():
        raise SlmError("the layer map is empty; give 'uniform' or pairs like '1:2,2:4'")
    seen: dict[int, str] = {}
    pairs: list[tuple[int, int, str]] = []
    for piece in (p.strip() for p in spec.split(",")):
        student, teacher = _parse_pair(piece, n_student, n_teacher)
        if student in seen:
            raise SlmError(f"layer map piece '{piece}': student layer {student} "
                           f"is already mapped by '{seen[student]}'")
        seen[student] = piece
        pairs.append((student, teacher, piece))
    pairs.sort()
    for (_, prev_teacher, prev_piece), (_, teacher, piece) in zip(pairs, pairs[1:]):
        if teacher <= prev_teacher:
            raise SlmError(f"layer map piece '{piece}': teacher layers must increase with student "
                           f"layers, but '{prev_piece}' already maps a lower student layer to "
                           f"teacher layer {prev_teacher}")
    return [(student, teacher) for student, teacher, _ in pairs]
