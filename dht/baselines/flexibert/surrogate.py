"""Heteroscedastic surrogate with epistemic and aleatoric uncertainty (FlexiBERT's BOSHNAS, adapted).

BOSHNAS models the performance of an architecture embedding x with three networks (the authors'
``boshnas/boshnas.py``): a *teacher* MLP with dropout predicting the performance, a *student* trained to predict
the standard deviation of the teacher's MC-dropout outputs (the epistemic uncertainty), and a natural-parameter
network (NPN) predicting mean and variance (the aleatoric uncertainty, from training noise).

Here one model gives both, as the project's issue allows: a deep ensemble (Lakshminarayanan et al. 2017) of M
small MLPs, each predicting a mean and a variance, trained with the Gaussian negative log-likelihood. Then

    mean       = average of the members' means
    epistemic  = variance of the members' means        (members disagree away from the data)
    aleatoric  = average of the members' variances      (noise the data itself shows)

which is the usual decomposition of the ensemble's predictive variance. Members differ by initialisation (and
optionally by a bootstrap of the data). The M members run as one batched network (``torch.baddbmm``), so a fit on
tens of points takes well under a second on one thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HeteroscedasticEnsemble", "SurrogatePrediction"]

_MIN_VAR = 1e-4  # floor on a member's variance (standardised units): keeps the NLL finite on a few points


@dataclass
class SurrogatePrediction:
    mean: np.ndarray  # [N]
    epistemic: np.ndarray  # [N] variance
    aleatoric: np.ndarray  # [N] variance

    @property
    def total(self) -> np.ndarray:
        return self.epistemic + self.aleatoric

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.total)


class _EnsembleMLP(nn.Module):
    """M independent MLPs in_dim -> hidden -> hidden -> (mean, raw variance), evaluated as batched matmuls."""

    def __init__(self, members: int, in_dim: int, hidden: int, generator: torch.Generator):
        super().__init__()
        sizes = [in_dim, hidden, hidden, 2]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1 / np.sqrt(a)  # nn.Linear's default init range, drawn per member from the seeded generator
            self.weights.append(nn.Parameter((torch.rand(members, a, b, generator=generator) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(members, 1, b, generator=generator) * 2 - 1) * bound))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, in] -> mean [M, N], variance [M, N]."""
        h = x.unsqueeze(0).expand(self.weights[0].shape[0], -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < len(self.weights) - 1:
                h = F.relu(h)  # ReLU members extrapolate linearly with different slopes: disagreement grows with distance
        return h[..., 0], F.softplus(h[..., 1]) + _MIN_VAR


class HeteroscedasticEnsemble:
    """Deep ensemble of mean/variance MLPs; ``fit(X, y)`` then ``predict(X)`` -> :class:`SurrogatePrediction`.

    Args:
        members: ensemble size M (5 by default, as in Lakshminarayanan et al. 2017).
        hidden: width of the two hidden layers.
        epochs: full-batch Adam steps per fit (the data are tens of points).
        lr, weight_decay: AdamW settings.
        mse_warmup: share of the steps that fit the means by MSE before the Gaussian NLL takes over: with the NLL
            from the start a member can explain a badly fitted point by a large variance instead of moving its
            mean (the NLL's known slow mean fitting), which on a handful of points it otherwise keeps.
        bootstrap: train each member on a bootstrap resample (more disagreement on tiny data).
        seed: seeds initialisation and bootstrap; ``fit`` is deterministic given the seed and the data.
    """

    def __init__(self, members: int = 5, hidden: int = 64, epochs: int = 400, lr: float = 1e-2,
                 weight_decay: float = 1e-4, mse_warmup: float = 0.3, bootstrap: bool = False, seed: int = 0):
        if members < 2:
            raise ValueError("an ensemble needs at least 2 members for an epistemic variance")
        self.members, self.hidden, self.epochs, self.lr = members, hidden, epochs, lr
        self.weight_decay, self.mse_warmup, self.bootstrap, self.seed = weight_decay, mse_warmup, bootstrap, seed
        self._net: _EnsembleMLP | None = None
        self._y_mean, self._y_std = 0.0, 1.0

    @property
    def fitted(self) -> bool:
        return self._net is not None

    def fit(self, X: np.ndarray, y: np.ndarray) -> HeteroscedasticEnsemble:
        x = torch.as_tensor(np.asarray(X, dtype=np.float32))
        t = torch.as_tensor(np.asarray(y, dtype=np.float32)).reshape(-1)
        if x.ndim != 2 or x.shape[0] != t.shape[0] or x.shape[0] == 0:
            raise ValueError(f"X must be [N, dim] and y [N] with N >= 1, got {tuple(x.shape)} and {tuple(t.shape)}")
        # Standardise targets: accuracies differ by fractions of a percent, the network should not care.
        self._y_mean = float(t.mean())
        self._y_std = float(t.std()) if t.numel() > 1 and float(t.std()) > 1e-8 else 1.0
        t = (t - self._y_mean) / self._y_std
        gen = torch.Generator().manual_seed(self.seed)
        net = _EnsembleMLP(self.members, x.shape[1], self.hidden, gen)
        n = x.shape[0]
        if self.bootstrap and n > 1:
            idx = torch.randint(n, (self.members, n), generator=gen)
            counts = torch.zeros(self.members, n).scatter_add_(1, idx, torch.ones(self.members, n))
        else:
            counts = torch.ones(self.members, n)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        warmup = int(self.mse_warmup * self.epochs)
        for step in range(self.epochs):
            mean, var = net(x)
            nll = 0.5 * (torch.log(var) + (mean - t) ** 2 / var)  # Gaussian NLL without its constant
            per_point = (mean - t) ** 2 if step < warmup else nll
            loss = (per_point * counts).sum() / counts.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        self._net = net.eval()
        return self

    @torch.no_grad()
    def predict(self, X: np.ndarray) -> SurrogatePrediction:
        if self._net is None:
            raise RuntimeError("fit the surrogate first")
        x = torch.as_tensor(np.asarray(X, dtype=np.float32))
        if x.ndim == 1:
            x = x[None]
        mean, var = self._net(x)  # [M, N] in standardised units
        scale = self._y_std**2
        return SurrogatePrediction(
            mean=(mean.mean(0) * self._y_std + self._y_mean).numpy().astype(np.float64),
            epistemic=(mean.var(0, unbiased=False) * scale).numpy().astype(np.float64),
            aleatoric=(var.mean(0) * scale).numpy().astype(np.float64),
        )
