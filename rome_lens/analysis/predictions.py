"""What each layer would predict next: the logit lens over every token of a text.

For each layer and each token of a text, the loss ``−log p(token | prefix)``
read off the residual stream after that layer through the model's own final
norm and unembedding (the logit lens, :func:`~rome_lens.analysis.lens.lens_log_probs`),
and that layer's top-1 guess for the token. Read as a (layer × token) heatmap,
the loss falls layer by layer, sooner for easy tokens. A text longer than the
context is read in windows of ``n_ctx`` tokens.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.analysis.predictions import intermediate_predictions
>>> model = tiny_model()
>>> result = intermediate_predictions(model, "The Eiffel Tower is in Paris.", progress=False)
>>> tuple(result.losses.shape)  # (layer, predicted token)
(3, 7)
>>> final = -model(model.to_tokens("The Eiffel Tower is in Paris."))[0].log_softmax(-1).detach()
>>> abs(float(result.losses[-1, 0]) - float(final[0, model.to_tokens("The")[0, 1]])) < 1e-4
True
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.analysis.lens import lens_log_probs
from rome_lens.analysis.states import check_text
from rome_lens.core.backend import Model
from rome_lens.core.corpus import Corpus
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.precision import to_host
from rome_lens.core.results import Result, layer_token_frame

__all__ = ["IntermediatePredictions", "intermediate_predictions"]


@dataclass
class IntermediatePredictions(Result):
    """Each layer's loss on, and top-1 guess for, every token of a text."""

    kind = "intermediate_predictions"
    text: str  # the text read
    str_tokens: list[str]  # the tokens predicted (every token but BOS)
    losses: Float[Tensor, "layer token"]  # −log p(token | prefix) read after each layer
    top_tokens: list[list[str]]  # [layer][token]: that layer's top-1 guess for the token
    fingerprint: str = ""  # model_fingerprint of the model

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (layer, token)."""
        return layer_token_frame(self.str_tokens, loss=self.losses, top_1=self.top_tokens)


@torch.no_grad()
def intermediate_predictions(
    model: Model, text: str, *, progress: bool = True
) -> IntermediatePredictions:
    """The logit lens's loss and top-1 guess for every token of ``text``, at every layer.

    Args:
        model: any TransformerLens model.
        text: the text (read in windows of ``n_ctx`` tokens if longer).
        progress: show a progress bar.

    Returns:
        The losses and guesses of every token but the first of each window (BOS, for
        models that prepend one).
    """
    check_text(text)
    chunks = Corpus.read([text]).chunks(model, max_length=model.cfg.n_ctx)
    losses, guesses, predicted = [], [], []
    for chunk in tqdm(chunks, desc="intermediate predictions", disable=not progress):
        log_probs = lens_log_probs(model, chunk.tokens[None])[:, 0, :-1]  # [layer pos vocab]
        following = chunk.tokens[1:].to(log_probs.device)  # what each position predicts
        picked = log_probs.gather(-1, following.expand(len(log_probs), -1)[..., None])
        losses.append(-picked[..., 0])
        guesses.append(log_probs.argmax(-1))
        predicted.append(following)
    loss = to_host(torch.cat(losses, dim=1))  # one move each, after the last window
    guess = to_host(torch.cat(guesses, dim=1))
    return IntermediatePredictions(
        text=text,
        str_tokens=[model.to_single_str_token(t) for t in torch.cat(predicted).tolist()],
        losses=loss,
        top_tokens=[[model.to_single_str_token(int(t)) for t in row] for row in guess],
        fingerprint=model_fingerprint(model),
    )
