"""Is the suite slower? Per-test times of two pytest runs, compared like for like.

    .venv/bin/python -m pytest -m "not gpu" -q --junitxml=before.xml   # on the old commit
    .venv/bin/python -m pytest -m "not gpu" -q --junitxml=after.xml    # on the new one
    .venv/bin/python scripts/test_times.py before.xml after.xml

Run both on one idle machine, back to back. A test is matched by module and name, or by its
name alone where that is unique (a module that was moved or renamed). The report gives both
totals, the total of the matched tests on each side (the like-for-like figure: new tests make a
suite longer without making it slower), then the modules and tests whose time moved by more
than `--threshold` seconds. (Before stop 47 the first test to use DeepSpeed paid a one-time
C++ build of ~45 s, so comparing against an older junit file moves that cost between modules.)
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

Key = tuple[str, str]  # (module, test name)


def load(path: Path) -> dict[Key, float]:
    """Seconds per test of one junit XML file."""
    times = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        times[(module, case.get("name", ""))] = float(case.get("time", 0.0))
    return times


def match(before: dict[Key, float], after: dict[Key, float]) -> list[tuple[Key, float, float]]:
    """(key, before s, after s) for every test of `before` found in `after`."""
    by_name: dict[str, list[Key]] = defaultdict(list)
    for key in after:
        by_name[key[1]].append(key)
    pairs = []
    for key, seconds in before.items():
        if key in after:
            pairs.append((key, seconds, after[key]))
        elif len(by_name[key[1]]) == 1:
            pairs.append((key, seconds, after[by_name[key[1]][0]]))
    return pairs


def report(before: dict[Key, float], after: dict[Key, float], threshold: float) -> list[str]:
    """The comparison's lines (see the module doc)."""
    pairs = match(before, after)
    old, new = sum(b for _, b, _ in pairs), sum(a for _, _, a in pairs)
    lines = [
        f"before: {len(before)} tests, {sum(before.values()):.1f} s",
        f"after: {len(after)} tests, {sum(after.values()):.1f} s",
        f"matched: {len(pairs)} tests, {old:.1f} s -> {new:.1f} s "
        f"({(new - old) / old * 100 if old else 0.0:+.1f}%)",
        f"new tests: {len(after) - len(pairs)}, {sum(after.values()) - new:.1f} s",
    ]
    modules: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (module, _), b, a in pairs:
        modules[module][0] += b
        modules[module][1] += a
    moved = [(a - b, module, b, a) for module, (b, a) in modules.items() if abs(a - b) > threshold]
    lines += [f"module {m}: {b:.1f} s -> {a:.1f} s ({d:+.1f})" for d, m, b, a in sorted(moved)]
    tests = [(a - b, f"{k[0]}::{k[1]}", b, a) for k, b, a in pairs if abs(a - b) > threshold]
    lines += [f"test {t}: {b:.1f} s -> {a:.1f} s ({d:+.1f})" for d, t, b, a in sorted(tests)]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the comparison of two junit XML files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--threshold", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    try:
        before, after = load(args.before), load(args.after)
    except (OSError, ET.ParseError) as exc:
        print(
            f"error: cannot read {exc} (pass junit XML files written by pytest --junitxml)",
            file=sys.stderr,
        )
        return 2
    print("\n".join(report(before, after, args.threshold)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
