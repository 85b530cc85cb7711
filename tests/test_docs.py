"""The numbers README.md and docs/development.md quote are the ones of docs/benchmarks.md's "Latest" table,
and the README's date is that section's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\|\s*([^|]+?)\s*\|\s*\**([\d.]+)\**\s*\|\s*\**([\d.]+)x\**\s*\|(.*)$")


def table_after(text: str, marker: str) -> list[str]:
    """The lines of the first markdown table after `marker` (header and separator included)."""
    lines = text[text.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def rows(table: list[str]) -> dict[str, tuple[float, float, str]]:
    """method -> (acceptance length, speedup vs AR, the per-task cells as written)."""
    out = {}
    for line in table[2:]:
        m = ROW.match(line)
        assert m, f"not a results row: {line!r}"
        out[m.group(1)] = (float(m.group(2)), float(m.group(3)), m.group(4).strip())
    return out


def latest() -> tuple[str, list[str]]:
    """(date, table) of docs/benchmarks.md's "## Latest" section."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    heading = next(line for line in text.splitlines() if line.startswith("## Latest"))
    date = re.search(r"\d{4}-\d{2}-\d{2}", heading).group(0)
    return date, table_after(text, heading)


def test_readme_table_is_the_latest_benchmark_table():
    date, table = latest()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Numbers, honestly"):]
    section = section[:section.index("\n## ", 1)]
    assert f"Current ({date}" in section, f"the README's numbers are not dated {date} (docs/benchmarks.md, Latest)"
    assert rows(table_after(section, "Current (")) == rows(table)
    assert len(rows(table)) >= 3


def test_development_notes_quote_the_latest_table():
    _, table = latest()
    want = rows(table)
    dev = " ".join((ROOT / "docs" / "development.md").read_text().split())
    quotes = re.findall(r"`([\w:-]+)` commits ([\d.]+) tokens per target forward(?: and runs at ([\d.]+)x AR)?", dev)
    assert quotes, "docs/development.md no longer quotes the benchmark"
    for method, tau, speed in quotes:
        assert float(tau) == want[method][0], (method, tau, want[method])
        if speed:
            assert float(speed) == want[method][1], (method, speed, want[method])


def test_row_parser_reads_bold_cells():
    assert rows(["| m | a | s |", "|---|---:|---:|", "| x:1 | **2.62** | 0.58x | 3 / **1.07x** |"]) == {
        "x:1": (2.62, 0.58, "3 / **1.07x** |")}
