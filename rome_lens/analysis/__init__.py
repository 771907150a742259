"""Analysis: why the model answers as it does, read off its residual stream.

This room holds the logit lens (:mod:`rome_lens.analysis.lens`): what each
layer's residual stream would predict if the model stopped there. It imports
:mod:`rome_lens.core` and :mod:`rome_lens.stats`, nothing above.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.analysis import logit_lens
>>> lens = logit_lens(tiny_model(), "The Eiffel Tower is in", targets=["Paris"], progress=False)
>>> lens.n_layers, lens.targets
(3, ['Paris'])
"""

from rome_lens.analysis.lens import LogitLens, lens_log_probs, logit_lens

__all__ = ["LogitLens", "lens_log_probs", "logit_lens"]
