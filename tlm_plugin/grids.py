"""ARC-style grids as text, and the invertible transformations of grids that few-shot test-time training uses.

The text format (AdaptEval's ARC rows and every grid augmentation): one grid row per line, top row first, each cell
one digit 0-9 (a colour; 0 is the background), the cells of a row separated by single spaces::

    0 0 3
    0 3 0

Grids written without separators (``003``, every row alike) parse too, and a transformed grid keeps the style of the text it came from. A grid
is rectangular and has at least one cell; anything else (a blank line inside, a letter, rows of different lengths) is
not a grid, and :func:`parse_grid` returns None for it. Leading and trailing blank space around the grid is ignored.
"""

import random
import re
from collections.abc import Callable


Grid = list[list[int]]

_SPACED = re.compile(r"^[0-9]( [0-9])*$")
_PACKED = re.compile(r"^[0-9]+$")
_ROW = re.compile(r"^([0-9]( [0-9])*|[0-9]+)$")
BACKGROUND = 0


def parse_grid(text: str) -> Grid | None:
    """The grid ``text`` holds (the whole text, blank space around it ignored), or None if it is not one."""
    if not isinstance(text, str):
        return None
    lines = [line.strip() for line in text.strip().split("\n")]
    if not lines or not lines[0]:
        return None
    if not (all(_SPACED.match(line) for line in lines) or all(_PACKED.match(line) for line in lines)):
        return None  # one style for the whole grid: every row spaced, or every row packed
    rows = [[int(c) for c in line if c != " "] for line in lines]
    if len({len(row) for row in rows}) != 1:
        return None
    return rows


def separator_of(text: str) -> str:
    """The cell separator the text uses: a space, or nothing for rows written as ``003``."""
    first = text.strip().split("\n", 1)[0]
    return " " if " " in first or len(first) == 1 else ""


def format_grid(grid: Grid, sep: str = " ") -> str:
    """``grid`` in the text format (cells separated by ``sep``)."""
    return "\n".join(sep.join(str(cell) for cell in row) for row in grid)


def extract_grid(text: str) -> Grid | None:
    """The first grid in a model's answer: the first run of consecutive grid lines (text around it ignored), or
    None if there is none."""
    if not isinstance(text, str):
        return None
    block: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if _ROW.match(line):
            block.append(line)
            continue
        if block:
            break
    grid = parse_grid("\n".join(block)) if block else None
    return grid


# ---------------------------------------------------------------------------------------------------------------
# The eight symmetries of the square (the dihedral group), each with its inverse


def rotate90(grid: Grid) -> Grid:
    """A quarter turn clockwise."""
    return [list(row) for row in zip(*grid[::-1], strict=True)]


def rotate180(grid: Grid) -> Grid:
    return [row[::-1] for row in grid[::-1]]


def rotate270(grid: Grid) -> Grid:
    """A quarter turn counter-clockwise."""
    return [list(row) for row in zip(*grid, strict=True)][::-1]


def flip_h(grid: Grid) -> Grid:
    """Mirror left to right."""
    return [row[::-1] for row in grid]


def flip_v(grid: Grid) -> Grid:
    """Mirror top to bottom."""
    return [list(row) for row in grid[::-1]]


def transpose(grid: Grid) -> Grid:
    """Mirror along the main diagonal (rows become columns)."""
    return [list(row) for row in zip(*grid, strict=True)]


def transpose_anti(grid: Grid) -> Grid:
    """Mirror along the anti-diagonal."""
    return rotate180(transpose(grid))


# name -> (transformation, its inverse)
DIHEDRAL: dict[str, tuple[Callable[[Grid], Grid], Callable[[Grid], Grid]]] = {
    "rot90": (rotate90, rotate270),
    "rot180": (rotate180, rotate180),
    "rot270": (rotate270, rotate90),
    "flip_h": (flip_h, flip_h),
    "flip_v": (flip_v, flip_v),
    "transpose": (transpose, transpose),
    "transpose_anti": (transpose_anti, transpose_anti),
}


def colour_permutation(seed: int) -> list[int]:
    """A seeded permutation of the colours 1-9 (index: colour, value: its new colour); 0 stays 0."""
    colours = list(range(1, 10))
    random.Random(seed).shuffle(colours)
    return [BACKGROUND, *colours]


def recolour(grid: Grid, mapping: list[int]) -> Grid:
    return [[mapping[cell] for cell in row] for row in grid]


def inverse_permutation(mapping: list[int]) -> list[int]:
    inverse = [0] * len(mapping)
    for colour, new in enumerate(mapping):
        inverse[new] = colour
    return inverse
