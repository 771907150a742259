"""Statistics of a model over a corpus: second moments of any hook, and ROME's key statistics.

:func:`~rome_lens.stats.moments.accumulate_moments` sums ``x`` and ``x xᵀ`` of
hook points' activations or gradients over a corpus in float64, caching each
result per model fingerprint, hook, corpus and token count.
:class:`~rome_lens.stats.keys.KeyStats` is its view for ``blocks.{L}.mlp.hook_post``:
the key second moment C that ROME and MEMIT solve with. Influence functions
read the same moments for their Kronecker factors. This room imports only
:mod:`rome_lens.core`.

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.stats import key_second_moment
>>> stats = key_second_moment(tiny_model(), 1, corpus=["The Louvre is in Paris."],
...                           cache_dir=tempfile.mkdtemp(), progress=False)
>>> stats.layer, stats.n_tokens, tuple(stats.moment.shape)
(1, 6, (256, 256))
"""

from rome_lens.stats.keys import DEFAULT_N_TOKENS, KeyStats, key_hook, key_second_moment
from rome_lens.stats.moments import Moments, accumulate_moments

__all__ = [
    "DEFAULT_N_TOKENS",
    "KeyStats",
    "Moments",
    "accumulate_moments",
    "key_hook",
    "key_second_moment",
]
