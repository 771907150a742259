"""Print the table of docs/scale.md: what rome_lens's heavy pieces cost on real models.

    python docs/cost_table.py           # print the markdown table
    python docs/cost_table.py --write   # and put it into docs/scale.md, between its markers

Every number comes from ``rome_lens.estimate_cost`` and the models' shapes alone:
nothing is loaded or run. GPT-2 XL, GPT-J-6B and Llama-3-8B are costed in
bfloat16, as they would run on an H200; the default model, SmolLM2-135M, in
float32, as it runs on a CPU. EK-FAC fits are costed in the passes
``fit_influence_factors`` makes by itself on an 80 GB GPU.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rome_lens.core.cost import (
    CPU,
    GPU_BYTES,
    H200,
    Cost,
    automatic_layers_per_pass,
    estimate_cost,
)

HERE = Path(__file__).resolve().parent
PAGE = HERE / "scale.md"
BEGIN, END = "<!-- cost table: begin -->", "<!-- cost table: end -->"
MODELS = {  # built-in shape -> (label, dtype costed)
    "gpt2-xl": ("GPT-2 XL", "bfloat16"),
    "gpt-j-6b": ("GPT-J-6B", "bfloat16"),
    "llama-3-8b": ("Llama-3-8B", "bfloat16"),
    "smollm2-135m": ("SmolLM2-135M (default)", "float32"),
}
WORKS = ("key_statistics", "rome_edit", "memit_1000", "memit_10000", "ekfac_factors", "scan")
COLUMNS = (
    "model", "dtype", "piece", "FLOPs", "peak memory", "weights", "cache",
    "fits 80 GB", "CPU, 200 GFLOP/s", "H200",
)  # fmt: skip


def table() -> str:
    """The markdown table: one row per model and piece."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for name, (label, dtype) in MODELS.items():
        for work in WORKS:
            cells = row(costed(name, work, dtype), label)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def costed(name: str, work: str, dtype: str) -> Cost:
    """The cost of ``work``; an EK-FAC fit in the passes it makes on an 80 GB GPU."""
    if work != "ekfac_factors":
        return estimate_cost(name, work, dtype=dtype)
    per_pass = automatic_layers_per_pass(name, GPU_BYTES, dtype=dtype)
    return estimate_cost(name, work, dtype=dtype, layers_per_pass=per_pass)


def row(cost: Cost, label: str) -> list[str]:
    """One row's cells."""
    fits = "yes" if cost.fits(GPU_BYTES) else f"no: {cost.exceeds(GPU_BYTES)[0]}"
    piece = f"`{cost.work}`"
    layers, per_pass = cost.settings.layers or (), cost.settings.layers_per_pass
    if per_pass is not None and per_pass < len(layers):
        piece += f", {math.ceil(len(layers) / per_pass)} passes of {per_pass} layers"
    return [
        label,
        str(cost.settings.dtype),
        piece,
        scientific(cost.flops),
        size(cost.peak_device_bytes),
        size(cost.weights_bytes),
        size(cost.persisted_bytes),
        fits,
        duration(cost.seconds(CPU)),
        duration(cost.seconds(H200)),
    ]


def scientific(value: float) -> str:
    """``8.7e13``: two significant figures and the exponent."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def size(n_bytes: float) -> str:
    """Bytes in GiB or MiB, three significant figures at most."""
    if n_bytes == 0:
        return "0"
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.3g} GiB"
    return f"{n_bytes / 2**20:.3g} MiB"


def duration(seconds: float) -> str:
    """Seconds as s, min, h or days, two significant figures (three from 100)"""
    value, unit = seconds, "s"
    for name, length in (("days", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= 2 * length:
            value, unit = seconds / length, name
            break
    return f"{value:.3g} {unit}" if value >= 100 else f"{value:.2g} {unit}"


def write(page: Path, text: str) -> None:
    """Replace what lies between the page's markers with ``text``."""
    content = page.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{page} has no {BEGIN} ... {END} markers")
    head, rest = content.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    page.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"update {PAGE.name}")
    args = parser.parse_args()
    text = table()
    print(text)
    if args.write:
        write(PAGE, text)


if __name__ == "__main__":
    main()
