"""Shared by the benchmark scripts: where the data lives, printing and saving tables, and
running the default model as any other model runs (without its shipped sample)."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pandas as pd

from rome_lens.core import corpus

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--data``: the folder holding counterfact_val.json and the known-facts files."""
    parser.add_argument(
        "--data",
        type=Path,
        default=SHARED_DATA,
        help=f"folder of counterfact_val.json, known_1000.json, known_smollm2.json "
        f"(default: {SHARED_DATA})",
    )


def data_file(folder: Path, name: str) -> Path:
    """``folder/name``, or exit with a message saying where it was looked for."""
    path = folder / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data FOLDER holding {name}")
    return path


def report(out: Path, name: str, table: pd.DataFrame) -> None:
    """Print ``table`` under a heading and write it to ``out/name.csv``."""
    print(f"\n== {name} ==")
    print(table.to_string(index=False))
    table.to_csv(out / f"{name}.csv", index=False)


def reset_peak() -> int:
    """Start a new window for :func:`peak_mib` (Linux resets VmHWM through clear_refs).

    Returns:
        The resident memory now, in MiB.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_mib() -> int:
    """This process's peak resident memory since :func:`reset_peak`, in MiB."""
    return _status_mib("VmHWM")


def _status_mib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no {field} in /proc/self/status: peak memory needs Linux")


def record_numbers(path: Path, numbers: list[str]) -> None:
    """Write ``numbers`` into the docs' numbers file, replacing lines of the same label.

    Each phase records as it ends, so an interrupted run keeps what it measured.
    """
    old = path.read_text().splitlines() if path.exists() else []
    labels = {line.split(":")[0] for line in numbers}
    kept = [line for line in old if line.split(":")[0] not in labels]
    path.write_text("\n".join(kept + numbers) + "\n")
    print("\n".join(numbers), flush=True)


@contextmanager
def nothing_shipped() -> Iterator[None]:
    """Hide the samples shipped with the package: the default model samples its corpus
    from itself, as every other model does (what a first run on another model costs)."""
    with (
        tempfile.TemporaryDirectory() as empty,
        mock.patch.object(corpus, "SHIPPED_SAMPLES", Path(empty)),
    ):
        yield
