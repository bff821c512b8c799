"""scripts/test_times.py: like-for-like comparison of two pytest junit files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "test_times.py"


@pytest.fixture(scope="module")
def times_script():  # the script as a module (not a test)
    spec = importlib.util.spec_from_file_location("test_times", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["test_times"] = module
    spec.loader.exec_module(module)
    return module


def junit(path: Path, cases: list[tuple[str, str, float]]) -> Path:
    body = "".join(f'<testcase classname="{c}" name="{n}" time="{t}"/>' for c, n, t in cases)
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def test_matched_tests_are_compared_like_for_like(times_script, tmp_path, capsys) -> None:
    before = junit(
        tmp_path / "before.xml",
        [("tests.unit.test_a", "test_x", 10.0), ("tests.old.test_b", "test_moved", 4.0)],
    )
    after = junit(
        tmp_path / "after.xml",
        [
            ("tests.unit.test_a", "test_x", 6.0),
            ("tests.new.test_c", "test_moved", 4.5),  # renamed module: matched by its name
            ("tests.unit.test_a", "test_new", 30.0),
        ],
    )
    assert times_script.main([str(before), str(after)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "before: 2 tests, 14.0 s" in out
    assert "after: 3 tests, 40.5 s" in out
    assert "matched: 2 tests, 14.0 s -> 10.5 s (-25.0%)" in out
    assert "new tests: 1, 30.0 s" in out
    assert "test test_a::test_x: 10.0 s -> 6.0 s (-4.0)" in out
    assert not any("test_moved" in line for line in out)  # moved by less than the threshold


def test_a_missing_file_is_one_error_line(times_script, tmp_path, capsys) -> None:
    assert times_script.main([str(tmp_path / "no.xml"), str(tmp_path / "no.xml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
