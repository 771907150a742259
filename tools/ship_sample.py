"""Write the default model's statistics sample that ships inside the package.

    python tools/ship_sample.py                                  # sample (TL 4), ~1.5 min
    PYTHONPATH=.tl3 python tools/ship_sample.py --add-backend    # TL 3's fingerprints too

Key statistics, the Microscope's reference fits and influence factors read a
seeded sample of the model's own text when no corpus is given. The default
model's first 20,000 tokens of it ship in ``rome_lens/core/data/`` so that a
fresh install reads them instead of sampling (see
:func:`rome_lens.core.corpus.shipped_sample`). Rerun both commands when the
default model's conversion, or the sampler, changes: the test
``tests/test_corpus.py`` fails while the shipped file no longer matches.
"""

from __future__ import annotations

import argparse
import tempfile

import rome_lens
from rome_lens.core.corpus import SHIPPED_SAMPLES, add_shipped_fingerprint, write_shipped_sample
from rome_lens.stats import DEFAULT_N_TOKENS

SHIPPED = SHIPPED_SAMPLES / "smollm2-135m-sample-s0.st"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--add-backend",
        action="store_true",
        help="add this backend's fingerprints to the shipped file instead of sampling",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        model = rome_lens.load_model(cache_dir=cache)
        if args.add_backend:
            add_shipped_fingerprint(model, SHIPPED)
        else:
            write_shipped_sample(model, SHIPPED, n_tokens=DEFAULT_N_TOKENS)
    print(f"wrote {SHIPPED} ({SHIPPED.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
