"""The docs name only files that exist: every `roundhouse/...py` path (or a room-relative one,
`trainer/loop.py`), and every `tests/`, `benchmarks/` or `scripts/` Python file, mentioned in
README.md or a page under docs/ is in the tree (job files are left out: examples name a user's
own, `configs/job.yaml`). A move table (`| old | new |`) may name the
old path in its first column; its new path must exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = sorted(
    p.name for p in (ROOT / "roundhouse").iterdir() if p.is_dir() and (p / "__init__.py").exists()
)
# `roundhouse/x/y.py`, `x/y.py` for a room x, or a file of the repository's other folders.
PATH = re.compile(
    r"(?<![\w/.-])("
    rf"(?:roundhouse/)?(?:{'|'.join(ROOMS)})/(?:\w+/)*\w+\.py"
    r"|roundhouse/\w+\.py"
    r"|(?:tests|benchmarks|scripts)/(?:\w+/)*\w+\.py"
    r")(?![\w/-])"
)


def doc_pages() -> list[Path]:
    """README.md and every Markdown page of the docs site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def file_of(path: str) -> Path:
    """The repository file a mentioned path names (room-relative ones under roundhouse/)."""
    top = path.split("/")[0]
    if top in ("roundhouse", "tests", "benchmarks", "scripts"):
        return ROOT / path
    return ROOT / "roundhouse" / path


def mentioned_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) of each file path in `text`, the old column of move tables left out."""
    found, in_moves = [], False
    for number, line in enumerate(text.splitlines(), 1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|"):
            if [c.lower() for c in cells[:2]] == ["old", "new"]:
                in_moves = True
            elif in_moves:
                line = "|".join(cells[1:])  # the old path of a move is gone by design
        else:
            in_moves = False
        found += [(number, m.group(1)) for m in PATH.finditer(line)]
    return found


def test_the_path_finder_finds_paths_and_skips_a_moves_old_column() -> None:
    text = (
        "`Checkpointer` (weights/checkpoint.py) and `roundhouse/launch/nope.py`;\n"
        "see tests/unit/test_x.py, not docs/x.py or /a/trainer/b.py\n"
        "| old | new |\n|---|---|\n| `trainer/checkpoint.py` | `weights/checkpoint.py` |\n"
    )
    assert mentioned_paths(text) == [
        (1, "weights/checkpoint.py"),
        (1, "roundhouse/launch/nope.py"),
        (2, "tests/unit/test_x.py"),
        (5, "weights/checkpoint.py"),
    ]
    assert file_of("weights/checkpoint.py").exists()
    assert not file_of("roundhouse/launch/nope.py").exists()


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_doc_page_names_exists(page: Path) -> None:
    missing = [
        f"{page.relative_to(ROOT)}:{number}: {path}"
        for number, path in mentioned_paths(page.read_text())
        if not file_of(path).exists()
    ]
    assert missing == []
