"""The numbers README.md and docs/development.md quote must be the ones in docs/benchmarks.md's table."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("ar", "pld")  # not speculative methods of this package


def greedy_table() -> dict[str, tuple[float, float]]:
    """method -> (acceptance length, speedup vs AR) from the first table of docs/benchmarks.md."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    start = text.index("#### Temperature 0 (greedy), all datasets")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        m = re.match(r"\|\s*([\w:-]+)\s*\|\s*([\d.]+)\s*\|\s*[\d.]+\s*\|\s*([\d.]+)x\s*\|", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    assert "ar" in rows and "dflash" in rows and len(rows) >= 4, rows
    return rows


def speculative_range(rows) -> tuple[float, float, str]:
    spec = {k: v[1] for k, v in rows.items() if k not in BASELINES}
    fastest = max(spec, key=spec.get)
    return min(spec.values()), max(spec.values()), fastest


def test_readme_numbers_match_the_benchmark_table():
    rows = greedy_table()
    lo, hi, fastest = speculative_range(rows)
    readme = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(r"speculative methods run at ([\d.]+)-([\d.]+)x AR", readme)
    assert m, "README no longer quotes the speculative speedup range"
    assert (float(m.group(1)), float(m.group(2))) == (lo, hi), f"README says {m.group(0)}, the table {lo}-{hi}x"
    if "CaDDTree fastest" in readme:
        assert fastest == "caddtree", f"README says CaDDTree is fastest, the table says {fastest}"
    m = re.search(r"\(([\d.]+) vs ([\d.]+) tokens per target forward at (\d+) nodes\)", readme)
    assert m, "README no longer quotes the tree vs chain acceptance"
    assert float(m.group(1)) == rows[f"ddtree:{m.group(3)}"][0]
    assert float(m.group(2)) == rows["dflash"][0]


def test_development_notes_match_the_benchmark_table():
    rows = greedy_table()
    lo, hi, _ = speculative_range(rows)
    dev = " ".join((ROOT / "docs" / "development.md").read_text().split())
    m = re.search(r"slower than AR \(([\d.]+)-([\d.]+)x\)", dev)
    assert m, "docs/development.md no longer quotes the speedup range"
    assert (float(m.group(1)), float(m.group(2))) == (lo, hi)
    for budget, value in re.findall(r"DDTree-(\d+) acceptance ([\d.]+)", dev):
        assert float(value) == rows[f"ddtree:{budget}"][0]
