"""Key statistics: the second moment C = E[k kᵀ] of an MLP's keys over text.

ROME treats ``blocks.{L}.mlp.W_out`` as a linear associative memory: the MLP's
hidden activation ``k`` (TransformerLens's ``blocks.{L}.mlp.hook_post``) is a
key, and ``W_outᵀ k`` is the value it recalls. An edit that inserts a new
key-value pair while disturbing the other keys as little as possible (in the
least-squares sense, over the keys the model actually meets) needs their second
moment ``C``. :func:`key_second_moment` estimates it as a view of the
:class:`~rome_lens.stats.moments.Moments` of ``blocks.{L}.mlp.hook_post``:

* **accumulated in float64**, ``C = Σ k kᵀ / n`` over every non-BOS token;
* **over text you pass** (strings, a ``.txt`` or ``.jsonl`` path, see
  :mod:`rome_lens.core.corpus`), or, by default, **over text the model samples
  itself**: sequences of 64 tokens from BOS, seeded and batched;
* **cached on disk**, keyed by the fingerprint of the weights feeding the key
  (:mod:`rome_lens.core.fingerprint`), the layer, the corpus and ``n_tokens``.
  Influence functions read the same cache entry for ``W_out``'s input factor.

The default sample, ``n_tokens=20_000``, is about 13 times ``d_mlp`` for the
default model, enough for a well-conditioned C at the layers ROME edits there
(condition numbers 220 to 48,000 at layers 2 to 12). The default model's
sample ships with the package, so its first layer takes about 5 s on a 2-core
CPU; another model first samples its corpus (about 80 s for a 135M model,
once per model, shared by every layer). Each further layer takes 5 to 15 s,
and a cached layer loads in well under a second.
``bench/bench_rome.py --only n_tokens`` measures editing quality against the
sample size.

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.stats.keys import key_second_moment
>>> model = tiny_model()
>>> texts = ["The Eiffel Tower is in Paris.", "The Louvre is a museum in Paris."]
>>> stats = key_second_moment(model, 1, corpus=texts, progress=False,
...                           cache_dir=tempfile.mkdtemp())
>>> stats.moment.shape, stats.moment.dtype, stats.n_tokens
(torch.Size([256, 256]), torch.float64, 20)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from functools import cached_property

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from rome_lens.core.backend import Model
from rome_lens.core.corpus import Corpus, CorpusSource
from rome_lens.core.fingerprint import check_fingerprint, check_layer, model_fingerprint
from rome_lens.core.precision import model_device
from rome_lens.core.results import Result
from rome_lens.stats.moments import Moments, accumulate_moments

__all__ = ["DEFAULT_N_TOKENS", "KeyStats", "checked_stats", "key_hook", "key_second_moment"]

DEFAULT_N_TOKENS = 20_000


def key_hook(layer: int) -> str:
    """The hook point of layer ``layer``'s MLP keys, ``blocks.{layer}.mlp.hook_post``.

    Args:
        layer: the MLP layer.

    Returns:
        The hook point name.
    """
    return f"blocks.{layer}.mlp.hook_post"


@dataclass
class KeyStats(Result):
    """The second moment of ``blocks.{layer}.mlp.hook_post`` over a corpus."""

    kind = "key_stats"
    layer: int
    """The MLP whose keys these are."""
    moments: Moments
    """Σk, Σk kᵀ and n of blocks.{layer}.mlp.hook_post."""
    seconds: float = 0.0
    """Time key_second_moment took (small when read from the cache)"""

    @cached_property
    def moment(self) -> Float[Tensor, "d_mlp d_mlp"]:
        """C = E[k kᵀ] (float64)."""
        return self.moments.second_moment

    @cached_property
    def eigenvalues(self) -> Float[Tensor, " d_mlp"]:
        """C's eigenvalues, ascending."""
        return torch.linalg.eigvalsh(self.moment)

    @property
    def n_tokens(self) -> int:
        """How many keys were averaged."""
        return self.moments.count

    @property
    def corpus(self) -> str:
        """Where the text came from."""
        return self.moments.corpus

    @property
    def fingerprint(self) -> str:
        """``model_fingerprint(model, upto_layer=layer)`` of the model the keys came from."""
        return self.moments.fingerprint

    @property
    def condition_number(self) -> float:
        """Largest over smallest eigenvalue (``inf`` when C is singular)."""
        low, high = self.eigenvalues[0].item(), self.eigenvalues[-1].item()
        return high / low if low > 0 else math.inf

    def check(self, model: Model, layer: int) -> None:
        """Raise ``ValueError`` unless these statistics belong to ``model`` at ``layer``."""
        if layer != self.layer:
            raise ValueError(f"statistics are for layer {self.layer}, not layer {layer}")
        self.check_model(model)

    def check_model(self, model: Model) -> None:
        """Raise ``ValueError`` unless these statistics were computed on ``model``."""
        found = model_fingerprint(model, upto_layer=self.layer)
        check_fingerprint(found, self.fingerprint, f"the key statistics of layer {self.layer}")

    def carried_to(self, model: Model) -> KeyStats:
        """These statistics, vouched for as ``model``'s: for a model edited since they were
        computed, when editing in a row keeps the unedited model's C (as ROME, MEMIT and
        AlphaEdit do).

        Args:
            model: the model (edited since).

        Returns:
            A copy that :meth:`check` accepts for ``model``.
        """
        found = model_fingerprint(model, upto_layer=self.layer)
        return KeyStats(self.layer, dataclasses.replace(self.moments, fingerprint=found), 0.0)

    def ridge(self, max_condition: float) -> float:
        """What to add to C's diagonal for a condition number of at most ``max_condition``.

        Zero for a well-conditioned C; otherwise it warns, since the edit then
        trusts the statistics less than asked.
        """
        condition = self.condition_number
        if condition <= max_condition:
            return 0.0
        low, high = self.eigenvalues[0].item(), self.eigenvalues[-1].item()
        ridge = (high - max_condition * low) / (max_condition - 1)
        warnings.warn(
            f"key statistics of layer {self.layer} are ill-conditioned (condition number "
            f"{condition:.3g} from {self.n_tokens} tokens): adding {ridge:.3g} to the diagonal; "
            "compute them over more tokens",
            stacklevel=3,
        )
        return ridge

    def regularized(self, ridge: float) -> Float[Tensor, "d_mlp d_mlp"]:
        """C + ridge · I (float64)."""
        return self.moment + ridge * torch.eye(
            len(self.moment), dtype=self.moment.dtype, device=self.moment.device
        )

    regularised = regularized  # its name before 0.3 (see the CHANGELOG)

    def to_dataframe(self) -> pd.DataFrame:
        """One row: layer, token count, corpus and conditioning."""
        row = {
            "layer": self.layer,
            "n_tokens": self.n_tokens,
            "corpus": self.corpus,
            "fingerprint": self.fingerprint,
            "trace": self.moment.trace().item(),
            "condition_number": self.condition_number,
            "seconds": self.seconds,
        }
        return pd.DataFrame([row])


def key_second_moment(
    model: Model,
    layer: int,
    *,
    corpus: CorpusSource | Corpus = None,
    n_tokens: int = DEFAULT_N_TOKENS,
    batch_size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
    distributed: bool | None = None,
) -> KeyStats:
    """Estimate C = E[k kᵀ] of ``blocks.{layer}.mlp.hook_post`` over ``n_tokens`` tokens.

    Args:
        model: any TransformerLens model with MLPs.
        layer: the MLP layer.
        corpus: strings, a ``.txt``/``.jsonl`` path, or ``None`` to sample text
            from the model (seeded by ``seed``).
        n_tokens: how many keys to average (fewer if a given corpus runs out).
        batch_size: sequences per forward pass.
        seed: seeds the sampled corpus.
        cache_dir: the rome_lens cache folder (default: see :mod:`rome_lens.core.cache`).
        use_cache: read and write the disk cache.
        progress: show progress bars, and say so before computing anything long.
        distributed: split the corpus over the ranks of the process group and sum
            (``None``: when one is initialised; see :mod:`rome_lens.core.distributed`).

    Returns:
        The statistics, with the time they took in ``seconds``.
    """
    check_layer(model, layer)
    started = time.perf_counter()
    hook = key_hook(layer)
    found = accumulate_moments(
        model,
        forward=[hook],
        corpus=corpus,
        n_tokens=n_tokens,
        seed=seed,
        batch_size=batch_size,
        cache_dir=cache_dir,
        use_cache=use_cache,
        progress=progress,
        announce=f"key statistics of layer {layer} ({hook})",
        distributed=distributed,
    )
    seconds = time.perf_counter() - started
    return KeyStats(layer, found[hook, "forward"], seconds)


def checked_stats(
    model: Model,
    layer: int,
    stats: KeyStats | None,
    *,
    n_tokens: int = DEFAULT_N_TOKENS,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> KeyStats:
    """``stats`` after checking they belong to ``model`` at ``layer``; if ``None``, the cached
    (or newly computed) statistics over ``n_tokens`` sampled tokens.

    Args:
        model: the model.
        layer: the MLP layer.
        stats: statistics given by the caller, or ``None``.
        n_tokens: tokens to compute them over when ``stats`` is ``None``.
        cache_dir: the rome_lens cache folder.
        use_cache: read and write the cached statistics, when computing them.
        progress: show progress bars.

    Returns:
        The statistics, on the model's device.
    """
    if stats is None:
        return key_second_moment(
            model, layer, n_tokens=n_tokens, cache_dir=cache_dir, use_cache=use_cache,
            progress=progress,
        )  # fmt: skip
    if not isinstance(stats, KeyStats):
        raise TypeError(f"stats must be KeyStats, got {type(stats).__name__}")
    stats.check(model, layer)
    moments = stats.moments.to(model_device(model))  # given ones may have been loaded on the CPU
    return stats if moments is stats.moments else dataclasses.replace(stats, moments=moments)
