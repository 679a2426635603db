"""The Hessian GPTQ solves against: the calibration inputs' X^T X / tokens, shrunk towards its diagonal as far
as two-fold cross-validation of GPTQ's own objective says it should be.

GPTQ minimises the error on the inputs a layer will see, E[d x x^T d^T], through the calibration tokens' sample
H = X^T X / tokens. With few tokens per input that is a poor estimate of E[x x^T]: singular below as many tokens
as inputs, where GPTQ fits the calibration tokens' null space at the cost of every other input (on correlated
Gaussian inputs with half as many tokens as inputs, GPTQ's error on fresh inputs is twice round-to-nearest's).
The standard remedy for a sample covariance with few samples is shrinkage, here towards the diagonal:
(1 - rho) H + rho diag(H), rho the Schaefer-Strimmer estimate (``shrinkage``). That rho minimises the error of
H's entries, not GPTQ's: on the same inputs with 2-10x as many tokens as inputs it over-shrinks (GPTQ's
fresh-input error up to 10% above the sample H's). So the weight is chosen per layer among 0, rho / 2 and rho
by cross-validation: the calibration samples alternate between two folds, and each candidate's GPTQ on one
fold's H is scored by its expected error on the other fold's, both ways (``expected_error``: GPTQ's error in
closed form, so no weight is quantized and the score is the same for every option). Cost: per distinct input,
six Cholesky factorizations and twelve triangular solves of in x in matrices beside GPTQ's own factorization
(GPTQ's build x2.8 on smollm2-135m on 2 CPU cores: experiments/bench_gptq_shrink.py), and a second X^T X sum
while collecting.

Written here because the GPTQ implementations this follows do not shrink their Hessian (the reference,
AutoGPTQ and GPTQModel damp it with a fixed fraction of the mean diagonal, as mpsearch's ``damp`` does) and
scikit-learn's ``LedoitWolf`` shrinks towards a scaled identity and needs the tokens themselves, not their
running sums.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CANDIDATES = (0.0, 0.5, 1.0)  # fractions of the Schaefer-Strimmer rho tried by cross-validation


class Moments:
    """Running sums of a layer's calibration inputs, per fold (samples alternate between the two): X^T X, the
    token count and the sum over tokens and pairs i != j of (x_i x_j)^2 that ``shrinkage`` needs."""

    def __init__(self) -> None:
        self.gram: list = [0, 0]
        self.tokens = [0, 0]
        self.fourth: list = [0, 0]
        self.samples = 0  # samples seen so far: the parity of a sample's index is its fold

    def add(self, x: torch.Tensor, sample: torch.Tensor, n_samples: int) -> None:
        """``x`` (tokens, in) float rows of ``n_samples`` samples, ``sample`` (tokens,) each row's sample index."""
        odd = (sample + self.samples) % 2 == 1
        self.samples += n_samples
        for k, part in enumerate((x[~odd], x[odd])):
            if len(part):
                self.gram[k] = self.gram[k] + part.T @ part
                self.tokens[k] += len(part)
                sq = part.square()  # per token: (sum_i x_i^2)^2 - sum_i x_i^4 = sum over pairs i != j of (x_i x_j)^2
                pairs = sq.sum(1, dtype=torch.float64).square_().sum() - sq.square_().sum(dtype=torch.float64)
                self.fourth[k] = self.fourth[k] + pairs  # a tensor: no device sync in a forward hook

    def hessian(self, fold: int | None = None) -> torch.Tensor:
        """X^T X / tokens of one fold, or of both (None)."""
        if fold is not None:
            return self.gram[fold] / max(self.tokens[fold], 1)
        return sum(g for g in self.gram if torch.is_tensor(g)) / max(sum(self.tokens), 1)

    def rho(self, h: torch.Tensor, fold: int | None = None) -> float:
        """``shrinkage`` of ``h``, the Hessian of ``fold`` (None: both)."""
        if fold is not None:
            return shrinkage(h, float(self.fourth[fold]), self.tokens[fold])
        return shrinkage(h, float(sum(self.fourth)), sum(self.tokens))


def shrinkage(h: torch.Tensor, fourth: float, tokens: int) -> float:
    """The weight rho in [0, 1] of the Ledoit-Wolf-type estimate (1 - rho) H + rho diag(H) of the inputs'
    population second moment, H = X^T X / tokens (Schaefer and Strimmer 2005, target "D": rho = the summed
    variance of H's off-diagonal entries over their summed squares; ``fourth`` = sum over tokens and pairs
    i != j of (x_i x_j)^2 gives the variances). Near 1 with fewer tokens than inputs, near 0 with many."""
    h = h.double()
    off = float(h.square().sum() - h.diagonal().square().sum())
    if off <= 0 or tokens < 2:
        return 1.0
    return min(1.0, max(0.0, (fourth / tokens - off) / (tokens * off)))


def shrink(h: torch.Tensor, rho: float) -> torch.Tensor:
    """(1 - rho) H + rho diag(H), in place: the diagonal kept, the rest scaled; returns ``h``."""
    diag = h.diagonal().clone()
    h.mul_(1 - rho).diagonal().copy_(diag)
    return h


def choose_rho(moments: Moments, rho: float, score: Callable) -> float:
    """The shrinkage GPTQ solves with: ``rho`` (the Schaefer-Strimmer estimate of both folds) times the
    candidate fraction whose GPTQ fitted on one fold errs least on the other (``score(h_fit, h_test)``)."""
    if rho <= 0:
        return 0.0
    if min(moments.tokens) == 0:  # one sample: nothing to cross-validate with, the estimate alone
        return rho
    folds = [moments.hessian(k).double() for k in (0, 1)]
    rhos = [moments.rho(h, k) for k, h in enumerate(folds)]
    errors = [0.0] * len(CANDIDATES)
    for fit, test in ((0, 1), (1, 0)):
        for k, c in enumerate(CANDIDATES):
            errors[k] += score(shrink(folds[fit].clone(), c * rhos[fit]), folds[test])
    return CANDIDATES[min(range(len(errors)), key=errors.__getitem__)] * rho


def expected_error(H: torch.Tensor, perm: torch.Tensor, h: torch.Tensor) -> float:
    """GPTQ's expected error per unit of rounding noise on inputs with Hessian ``h``, when it solves with the
    damped ``H`` in its column order ``perm`` (``gptq.damped``).

    GPTQ quantizes column i (in its order) with rounding error r_i and leaves the error row d = e U, e_i =
    r_i / U_ii, U the upper Cholesky factor of H^-1 (``Factor.hinv``). With rounding errors independent and of
    equal variance across columns (the analysis of OBQ/GPTQ), the expected d h d^T is proportional to
    sum_i (U h U^T)_ii / U_ii^2 (on H itself U H U^T = I, and this is sum_i 1 / U_ii^2). U comes from the
    Cholesky factor of H with rows and columns reversed, J H J = L L^T: U = J L^-1 J, so the sum is
    sum_j (L^-1 h' L^-T)_jj L_jj^2 with h' = J h J in GPTQ's order: one Cholesky factorization and two
    triangular solves, a third of ``factor``'s work."""
    L = torch.linalg.cholesky(H.flip(0, 1))
    back = perm.flip(0)  # GPTQ's order reversed: h' in one copy
    y = torch.linalg.solve_triangular(L, h.to(H.device, torch.float64)[back[:, None], back], upper=False)  # L^-1 h'
    z = torch.linalg.solve_triangular(L, y.mT, upper=False)  # L^-1 h' L^-T
    return float((z.diagonal() * L.diagonal().square()).sum())
