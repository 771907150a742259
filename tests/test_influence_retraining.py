"""Influence scores against the truth they approximate: leave one text out and train again.

The last MLP's ``W_out`` (and ``b_out``) of a small model is trained to convergence on 50
short texts, with everything else frozen, on the mean summed next-token loss plus an L2
pull towards the starting weights (which makes the optimum unique): full-batch L-BFGS,
then Newton steps with the exact Hessian until the gradient is under 1e-10. For each
text, the same training without it, started from the optimum, gives the exact
leave-one-out change in each query's log-probability. Influence scores of the
trained model on the same weight should rank the texts as those changes do.

Thresholds, measured on this set-up (8 queries): Spearman between EK-FAC scores and the
leave-one-out drop 0.60-0.89 (mean 0.73), K-FAC 0.58-0.88 (mean 0.74), the plain
gradient dot product ("identity") 0.35-0.63 (mean 0.46). The test asserts a mean of at
least 0.5 for EK-FAC and K-FAC, every query above 0.3, and the curvature-aware scores
ahead of the dot product by at least 0.15 on average: margins that survive float noise,
not a second run of the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from rome_lens.core.backend import Model
from rome_lens.influence import (
    InfluenceFactors,
    ScoreSettings,
    fit_influence_factors,
    influence_many,
)

from .conftest import micro_model

pytestmark = pytest.mark.slow  # 51 trainings to convergence: about a minute

NAMES = ["Anna", "Ben", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jana"]
CITIES = ["Paris", "Rome", "Berlin", "Oslo", "Lima"]
LIKES = ["tea", "jazz", "chess", "rain", "bread"]
TEXTS = (
    [f"{n} lives in {CITIES[i % 5]}." for i, n in enumerate(NAMES)]
    + [f"{n} likes {LIKES[i % 5]}." for i, n in enumerate(NAMES)]
    + [f"The city of {c} is old." for c in CITIES]
    + [f"{c} has a river." for c in CITIES]
    + [f"{NAMES[i]} met {NAMES[(i + 3) % 10]} in {CITIES[(i + 1) % 5]}." for i in range(10)]
    + [f"We saw {c} at night." for c in CITIES]
    + [f"{n} sings." for n in NAMES]
)  # 50 texts
QUERIES = [(f"{n} lives in", f" {CITIES[i % 5]}") for i, n in enumerate(NAMES[:8])]
WEIGHT_DECAY = 5e-2  # large enough that the last MLP's loss is convex: Newton converges


class LastMLP:
    """A model's log-probabilities as a function of its last ``W_out`` and ``b_out`` alone.

    Everything below the last MLP's output is frozen, so it is run once: the residual
    stream before that output is added, and the MLP's hidden activations.
    """

    def __init__(self, model: Model, texts: list[str]) -> None:
        self.model = model
        self.layer = model.cfg.n_layers - 1
        self.mlp = model.blocks[self.layer].mlp
        tokens = [model.to_tokens(text)[0] for text in texts]
        width = max(len(t) for t in tokens)
        d_model, d_mlp = model.cfg.d_model, model.cfg.d_mlp
        n = len(tokens)
        self.resid = torch.zeros(n, width, d_model, dtype=torch.float64)  # [text pos d_model]
        self.hidden = torch.zeros(n, width, d_mlp, dtype=torch.float64)  # [text pos d_mlp]
        self.tokens = torch.zeros(n, width, dtype=torch.long)
        self.mask = torch.zeros(n, width - 1, dtype=torch.float64)  # [text pos]: real targets
        names = [f"blocks.{self.layer}.hook_resid_mid", f"blocks.{self.layer}.mlp.hook_post"]
        with torch.no_grad():
            for i, t in enumerate(tokens):
                _, cache = model.run_with_cache(t[None], names_filter=names)
                self.resid[i, : len(t)] = cache[names[0]][0].double()
                self.hidden[i, : len(t)] = cache[names[1]][0].double()
                self.tokens[i, : len(t)] = t
                self.mask[i, : len(t) - 1] = 1.0

    def weights(self) -> Tensor:
        """``W_out`` and ``b_out`` flattened, in float64."""
        return torch.cat([self.mlp.W_out.detach().flatten(), self.mlp.b_out.detach()]).double()

    def load(self, theta: Tensor) -> None:
        """Write ``theta`` into the model's ``W_out`` and ``b_out``."""
        w, b = self._split(theta)
        with torch.no_grad():
            self.mlp.W_out.copy_(w)
            self.mlp.b_out.copy_(b)

    def log_probs(self, theta: Tensor, rows: Tensor) -> Tensor:
        """``[text pos vocab]`` next-token log-probabilities of the texts ``rows``."""
        w, b = self._split(theta)
        return self._read_out(self.resid[rows] + self.hidden[rows] @ w + b)

    def loss(self, theta: Tensor, rows: Tensor) -> Tensor:
        """Summed next-token loss of each text in ``rows``."""
        log_probs = self.log_probs(theta, rows)[:, :-1]
        picked = log_probs.gather(-1, self.tokens[rows, 1:, None])[..., 0]
        return -(picked * self.mask[rows]).sum(-1)

    def hessian(self, theta: Tensor, rows: Tensor) -> Tensor:
        """``[n_theta n_theta]``: the exact Hessian in ``theta`` of the texts' summed loss.

        The loss reaches ``theta`` only through ``z = hidden @ W_out + b_out``, which is
        linear in it, so each position's Hessian is ``(ĥ ĥᵀ) ⊗ ∇²_z loss`` with
        ``ĥ = [hidden, 1]``: a ``d_model × d_model`` Hessian per position, from torch.func.
        """
        w, b = self._split(theta)
        hidden, tokens = self.hidden[rows], self.tokens[rows]
        z = hidden @ w + b  # [text pos d_model]
        targets = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # next tokens

        def position_loss(z_at: Tensor, resid_at: Tensor, target: Tensor) -> Tensor:
            return -self._read_out(resid_at + z_at).gather(-1, target[None])[0]

        second = torch.func.jacrev(torch.func.jacrev(position_loss))
        per_position = torch.func.vmap(torch.func.vmap(second))
        curvature = per_position(z, self.resid[rows], targets)  # [text pos d_model d_model]
        mask = self.mask[rows]
        scored = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)  # [text pos]
        curvature = curvature.detach() * scored[..., None, None]
        inputs = torch.cat([hidden, torch.ones_like(hidden[..., :1])], dim=-1)
        n_in, n_out = inputs.shape[-1], curvature.shape[-1]
        outer = (inputs[..., :, None] * inputs[..., None, :]).reshape(-1, n_in * n_in)
        blocks = outer.T @ curvature.reshape(-1, n_out * n_out)  # Σ over texts and positions
        blocks = blocks.reshape(n_in, n_in, n_out, n_out).permute(0, 2, 1, 3)
        return blocks.reshape(theta.numel(), theta.numel())

    def _read_out(self, resid: Tensor) -> Tensor:
        """The final residual stream through ``ln_final`` and the unembedding, as log-probs."""
        model = self.model
        x = resid - resid.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        x = x * model.ln_final.w.detach().double() + model.ln_final.b.detach().double()
        return (x @ model.W_U.detach().double() + model.b_U.detach().double()).log_softmax(-1)

    def _split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        d_mlp, d_model = self.mlp.W_out.shape
        return theta[:-d_model].view(d_mlp, d_model), theta[-d_model:]


def minimise(objective: Callable[[Tensor], Tensor], start: Tensor) -> Tensor:
    """Full-batch L-BFGS from ``start``: close to the optimum, not at it."""
    theta = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([theta], max_iter=300, history_size=50,
                                  line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> Tensor:
        optimiser.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    optimiser.step(closure)
    return theta.detach()


def newton(
    objective: Callable[[Tensor], Tensor], start: Tensor, curvature: Callable[[Tensor], Tensor]
) -> Tensor:
    """Newton's method with the exact Hessian until every entry of the gradient is under 1e-10."""
    theta = start.clone()
    for _ in range(20):
        gradient = torch.func.grad(objective)(theta)
        if gradient.abs().max() < 1e-10:
            return theta
        theta = theta - torch.linalg.solve(curvature(theta), gradient)
    raise AssertionError(f"training did not converge: gradient {gradient.abs().max():.1e}")


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (no ties among continuous scores)."""
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


@pytest.fixture(scope="module")
def retrained():
    """The trained model, its last MLP's view, and the ``[text query]`` leave-one-out changes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny float64 steps: threads only contend
    try:
        model = micro_model()
        mlp = LastMLP(model, TEXTS)
        start = mlp.weights()
        everything = torch.arange(len(TEXTS))

        def objective(rows: Tensor) -> Callable[[Tensor], Tensor]:
            def value(theta: Tensor) -> Tensor:
                pull = 0.5 * WEIGHT_DECAY * (theta - start).pow(2).sum()
                return mlp.loss(theta, rows).sum() / len(TEXTS) + pull

            return value

        queries = LastMLP(model, [p + c for p, c in QUERIES])
        prompt_lengths = [model.to_tokens(p).shape[1] for p, _ in QUERIES]

        def query_log_probs(theta: Tensor) -> Tensor:
            with torch.no_grad():
                log_probs = queries.log_probs(theta, torch.arange(len(QUERIES)))
            found = []
            for q, n in enumerate(prompt_lengths):
                length = int(queries.mask[q].sum()) + 1
                targets = queries.tokens[q, n:length]
                found.append(log_probs[q, n - 1 : length - 1].gather(-1, targets[:, None]).sum())
            return torch.stack(found)

        ridge = WEIGHT_DECAY * torch.eye(start.numel(), dtype=torch.float64)

        def curvature(rows: Tensor) -> Callable[[Tensor], Tensor]:
            return lambda theta: mlp.hessian(theta, rows) / len(TEXTS) + ridge

        trained = newton(objective(everything), minimise(objective(everything), start),
                         curvature(everything))  # fmt: skip
        base = query_log_probs(trained)
        changes = []  # what leaving each text out did to each query
        for j in range(len(TEXTS)):
            rest = everything[everything != j]
            retrained = newton(objective(rest), trained, curvature(rest))
            changes.append(query_log_probs(retrained) - base)
        mlp.load(trained)
    finally:
        torch.set_num_threads(previous)
    return model, mlp, torch.stack(changes)  # [text query]


@pytest.fixture(scope="module")
def factors(retrained, tmp_path_factory) -> InfluenceFactors:
    """EK-FAC factors of the trained ``W_out`` (they also serve K-FAC and identity)."""
    model = retrained[0]
    return fit_influence_factors(model, TEXTS, layers=[model.cfg.n_layers - 1],
                                 weights=["W_out"], n_tokens=5000, fisher="empirical",
                                 cache_dir=tmp_path_factory.mktemp("factors"),
                                 progress=False)  # fmt: skip


def scores(model: Model, factors: InfluenceFactors, strategy: str) -> Tensor:
    """``[text query]`` influence scores of the trained ``W_out``."""
    results = influence_many(model, factors, QUERIES, TEXTS, top_k=len(TEXTS),
                             settings=ScoreSettings(strategy=strategy), progress=False)  # fmt: skip
    table = torch.zeros(len(TEXTS), len(QUERIES))
    for q, result in enumerate(results):
        table[result.all_ids, q] = result.all_scores.float()
    return table


class TestAgainstRetraining:
    def test_the_frozen_part_is_the_model(self, retrained):
        """The cached lower layers give the model's own log-probabilities (to 1e-5)."""
        model, mlp, _ = retrained
        for row in range(3):
            length = int(mlp.mask[row].sum()) + 1
            expected = model(mlp.tokens[row : row + 1, :length]).log_softmax(-1).double()
            found = mlp.log_probs(mlp.weights(), torch.tensor([row]))[:, :length]
            torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)

    def test_the_hessian_is_exact(self, retrained):
        """The per-position Kronecker form equals torch.func's Hessian of the loss."""
        _, mlp, _ = retrained
        rows, theta = torch.arange(3), mlp.weights()
        expected = torch.func.hessian(lambda t: mlp.loss(t, rows).sum())(theta)
        torch.testing.assert_close(mlp.hessian(theta, rows), expected, atol=1e-12, rtol=0)

    def test_leaving_a_text_out_changes_the_queries(self, retrained):
        """Retraining without a text moves the queries, most for a text that states the answer."""
        _, _, changes = retrained
        assert changes.abs().max() > 1e-3
        for q in range(len(QUERIES)):
            # "{name} lives in {city}." is text q; text q ± 5 names the same city
            assert int(changes[:, q].argmin()) in {q % 5, q % 5 + 5}

    @pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
    def test_curvature_aware_scores_rank_as_retraining_does(self, retrained, factors, strategy):
        """EK-FAC and K-FAC scores rank the texts as leave-one-out retraining does."""
        model, _, changes = retrained
        found = scores(model, factors, strategy)
        plain = scores(model, factors, "identity")
        ours = [spearman(found[:, q], -changes[:, q]) for q in range(len(QUERIES))]
        dots = [spearman(plain[:, q], -changes[:, q]) for q in range(len(QUERIES))]
        assert sum(ours) / len(ours) >= 0.5 and min(ours) > 0.3, ours
        assert sum(ours) / len(ours) > sum(dots) / len(dots) + 0.15, (ours, dots)
