"""A lexical prefilter for large collections: BM25 keeps the texts worth a gradient pass.

Scoring a text costs a forward and a backward pass; ranking it by BM25 (the
classic term-frequency score, here from the ``bm25s`` library) costs
microseconds. :func:`bm25_top` keeps each query's best ``k`` texts, so the
gradient pass runs on those alone. Grosse et al. prefilter with TF-IDF the
same way; a text that shares no word with the query is then never scored.

>>> from rome_lens.influence.prefilter import bm25_top
>>> texts = ["The Eiffel Tower is in Paris.", "Cats sleep a lot.", "Paris is in France."]
>>> bm25_top(texts, ["Where is the Eiffel Tower?"], k=2)
[[0, 2]]
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bm25_top"]


def bm25_top(texts: Sequence[str], queries: Sequence[str], k: int) -> list[list[int]]:
    """The indices of each query's ``k`` best texts by BM25, best first.

    Args:
        texts: the collection.
        queries: one string per query (prompt and completion).
        k: how many texts to keep per query (at most all of them).

    Returns:
        One list of text indices per query.
    """
    import bm25s

    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    k = min(k, len(texts))
    index = bm25s.BM25()
    index.index(
        bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False
    )
    tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
    found, _ = index.retrieve(tokens, k=k, show_progress=False)
    return [[int(i) for i in row] for row in found]
