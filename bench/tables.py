"""Printing and saving benchmark tables, shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def report(out: Path, name: str, table: pd.DataFrame) -> None:
    """Print ``table`` under a heading and write it to ``out/name.csv``."""
    print(f"\n== {name} ==")
    print(table.to_string(index=False))
    table.to_csv(out / f"{name}.csv", index=False)
