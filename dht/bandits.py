"""The contextual bandits of DHT (paper Sections 3.1, 3.2 and 4.3).

* :class:`LinUCB` -- Algorithm 1 (Li et al. 2010, disjoint LinUCB) over the aggregated vector
  w = [x ; z_k ; e]; used as UCB_L (layers), UCB_H (heads per layer group, e = one-hot group index) and
  UCB_cp (layers and heads at once).
* :class:`LogisticThompsonHeads` -- the TSB of Section 3.2: a combinatorial semi-bandit over the N_H heads,
  one Laplace-approximated online Bayesian logistic regression per head (Chapelle & Li 2011, Algorithm 3),
  top-k heads by sampled success probability.

The rewards they learn from (Section 4.3) are in :mod:`dht.rewards`.

All statistics are float64 on the device given at construction; every random draw goes through the bandit's
own ``torch.Generator`` and ``state_dict()`` carries the generator state, so a resumed run makes exactly the
same choices as an uninterrupted one. See ``docs/bandits.md`` for every reading of the paper taken here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LinUCB", "LogisticThompsonHeads"]

_F64 = torch.float64


def _to64(x: Tensor | float, device: torch.device) -> Tensor:
    return torch.as_tensor(x).detach().to(device=device, dtype=_F64)


def _make_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def _allowed_mask(allowed: Tensor | None, batch: int, n_arms: int, device: torch.device) -> Tensor | None:
    """Broadcast an optional ``[K]`` or ``[B, K]`` arm mask to ``[B, K]`` bool."""
    if allowed is None:
        return None
    mask = torch.as_tensor(allowed, device=device).bool()
    if mask.shape == (n_arms,):
        mask = mask.expand(batch, n_arms)
    if mask.shape != (batch, n_arms):
        raise ValueError(f"allowed must be [K] or [B, K] = {(batch, n_arms)}, got {tuple(mask.shape)}")
    return mask


def _argmax_random_ties(scores: Tensor, generator: torch.Generator) -> Tensor:
    """Row-wise argmax; exact (to rounding) ties are broken uniformly at random with ``generator``.

    Ties are real at the start (theta = 0 makes every greedy score 0); always taking the first arm would
    bias the early data towards arm 0.
    """
    best = scores.max(dim=-1, keepdim=True).values
    tied = scores >= best - 1e-12 * (1.0 + best.abs())
    keys = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=_F64)
    return keys.masked_fill(~tied, -1.0).argmax(dim=-1)


def _chol_inverse(a: Tensor) -> Tensor:
    """Inverse of a batch of SPD matrices via Cholesky (exact refresh of A^{-1} from A)."""
    return torch.cholesky_inverse(torch.linalg.cholesky(a))


# ----------------------------------------------------------------------------------------------------------
# LinUCB: paper Algorithm 1 (Section 3.1), Li et al. (2010) disjoint model
# ----------------------------------------------------------------------------------------------------------
class LinUCB:
    """Disjoint LinUCB with arm features, Algorithm 1 of the paper.

    Per arm k: ``A_k = lambda * I``, ``b_k = 0`` (line 1); ``theta_k = A_k^{-1} b_k`` (line 5);
    ``f_{i,k} = w_{i,k}^T theta_k + alpha * sqrt(w_{i,k}^T A_k^{-1} w_{i,k})`` (line 6); pick the argmax
    (line 7); ``A_k += w w^T``, ``b_k += r w`` for the chosen arm (lines 8-9).

    The aggregated vector is ``w_{i,k} = [x_i ; z_k ; e_i]``: context ``x`` ``[dx]``, arm feature ``z_k``
    ``[dz]`` (fixed, given at construction), optional per-sample extra vector ``e`` ``[de]`` (the one-hot
    layer-group index e_l of UCB_H; ``extra_dim=0`` for UCB_L / UCB_cp).

    Note: with per-arm parameters (the disjoint model the paper's Algorithm 1 describes), ``z_k`` is a
    constant for arm k and so only acts as a learned per-arm intercept; it does not share information
    between arms.

    Numerics: ``A`` and ``b`` are kept exactly (plain sums). ``A^{-1}`` is updated by a batched Woodbury
    identity (Sherman-Morrison when one sample hits an arm) when at most ``max(1, d // 4)`` samples hit each
    arm in an update call, and recomputed from ``A`` by Cholesky when more do (cheaper then, and exact) and
    every ``refresh_every`` rank-one updates of an arm (bounds the round-off drift of the incremental
    updates; ``None`` disables the periodic refresh).
    """

    def __init__(
        self,
        arm_features: Tensor,
        context_dim: int,
        extra_dim: int = 0,
        *,
        alpha: float = 1.0,
        lam: float = 1.0,
        refresh_every: int | None = 1024,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if lam <= 0:
            raise ValueError(f"lam (ridge factor lambda) must be > 0 so that A is invertible, got {lam}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive int or None, got {refresh_every}")
        self.device = torch.device(device)
        z = _to64(arm_features, self.device)
        if z.dim() != 2:
            raise ValueError(f"arm_features must be [K, dz] (dz may be 0), got shape {tuple(z.shape)}")
        self.arm_features = z
        self.num_arms, self.arm_dim = z.shape
        self.context_dim = int(context_dim)
        self.extra_dim = int(extra_dim)
        self.dim = self.context_dim + self.arm_dim + self.extra_dim
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.refresh_every = refresh_every
        k, d = self.num_arms, self.dim
        # Algorithm 1, line 1: A_k <- lambda I, b_k <- 0 for each arm.
        eye = torch.eye(d, dtype=_F64, device=self.device)
        self.A = (self.lam * eye).repeat(k, 1, 1)
        self.b = torch.zeros(k, d, dtype=_F64, device=self.device)
        self.A_inv = (eye / self.lam).repeat(k, 1, 1)
        self.counts = torch.zeros(k, dtype=torch.int64, device=self.device)  # updates per arm
        self._since_refresh = torch.zeros(k, dtype=torch.int64, device=self.device)
        self.generator = _make_generator(seed, self.device)

    # -- Algorithm 1, line 3: observe the arm features and build w_{i,k} ------------------------------
    def _parts(self, contexts: Tensor, extra: Tensor | None) -> tuple[Tensor, Tensor]:
        x = _to64(contexts, self.device)
        if x.dim() != 2 or x.shape[1] != self.context_dim:
            raise ValueError(f"contexts must be [B, {self.context_dim}], got shape {tuple(x.shape)}")
        if self.extra_dim == 0:
            if extra is not None and extra.numel() > 0:
                raise ValueError("extra given but this bandit was built with extra_dim=0")
            e = x.new_zeros(x.shape[0], 0)
        else:
            if extra is None:
                raise ValueError(
                    f"this bandit needs extra [B, {self.extra_dim}] (e.g. the one-hot group index)"
                )
            e = _to64(extra, self.device)
            if e.shape != (x.shape[0], self.extra_dim):
                raise ValueError(
                    f"extra must be [B, {self.extra_dim}] = {(x.shape[0], self.extra_dim)}, got {tuple(e.shape)}"
                )
        return x, e

    def aggregate(self, contexts: Tensor, extra: Tensor | None = None) -> Tensor:
        """Aggregated vectors ``w_{i,k} = [x_i ; z_k ; e_i]`` for every sample and arm: ``[B, K, d]``."""
        x, e = self._parts(contexts, extra)
        batch, k = x.shape[0], self.num_arms
        return torch.cat(
            [
                x[:, None, :].expand(batch, k, self.context_dim),
                self.arm_features[None, :, :].expand(batch, k, self.arm_dim),
                e[:, None, :].expand(batch, k, self.extra_dim),
            ],
            dim=-1,
        )

    # -- Algorithm 1, line 5 ----------------------------------------------------------------------------
    def theta(self) -> Tensor:
        """Ridge estimates ``theta_k = A_k^{-1} b_k``, ``[K, d]``."""
        return (self.A_inv @ self.b.unsqueeze(-1)).squeeze(-1)

    # -- Algorithm 1, line 6 ----------------------------------------------------------------------------
    def scores(self, contexts: Tensor, extra: Tensor | None = None, greedy: bool = False) -> Tensor:
        """UCB scores ``f_{i,k}`` ``[B, K]``; ``greedy`` drops the exploration bonus (inference policy)."""
        w = self.aggregate(contexts, extra)  # [B, K, d]
        mean = torch.einsum("bkd,kd->bk", w, self.theta())
        if greedy:
            return mean
        a_inv_w = torch.einsum("kde,bke->bkd", self.A_inv, w)
        # clamp: w^T A^{-1} w >= 0 mathematically, rounding can make it -1e-17
        bonus = (w * a_inv_w).sum(-1).clamp_min(0.0).sqrt()
        return mean + self.alpha * bonus

    # -- Algorithm 1, line 7 ----------------------------------------------------------------------------
    def select(
        self,
        contexts: Tensor,
        extra: Tensor | None = None,
        greedy: bool = False,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """Choose one arm per sample: ``argmax_k f_{i,k}`` over the ``allowed`` arms (``[K]`` or ``[B, K]``).

        Vectorised over the batch; ties are broken at random with the bandit's generator.
        """
        f = self.scores(contexts, extra, greedy)
        mask = _allowed_mask(allowed, f.shape[0], self.num_arms, self.device)
        if mask is not None:
            if not bool(mask.any(dim=-1).all()):
                raise ValueError("every sample needs at least one allowed arm")
            f = f.masked_fill(~mask, float("-inf"))
        return _argmax_random_ties(f, self.generator)

    # -- Algorithm 1, lines 8-9 -------------------------------------------------------------------------
    def update(self, contexts: Tensor, arms: Tensor, rewards: Tensor, extra: Tensor | None = None) -> None:
        """``A_k += w w^T`` and ``b_k += r w`` for every (sample, chosen arm) of the batch."""
        x, e = self._parts(contexts, extra)
        arms = torch.as_tensor(arms, device=self.device).long().reshape(-1)
        r = _to64(rewards, self.device).reshape(-1)
        batch, k, d = x.shape[0], self.num_arms, self.dim
        if arms.shape[0] != batch or r.shape[0] != batch:
            raise ValueError(
                f"need one arm and one reward per context: {batch}, {arms.shape[0]}, {r.shape[0]}"
            )
        if batch == 0:
            return
        if bool((arms < 0).any()) or bool((arms >= k).any()):
            raise ValueError(f"arm index out of range [0, {k})")
        if not bool(torch.isfinite(r).all()):
            raise ValueError("rewards must be finite")
        # Group the samples by arm into a zero-padded [K, n_max, d] block so that every arm is updated in
        # one batched matmul (zero rows add nothing to A, b or the Woodbury correction).
        order = torch.argsort(arms, stable=True)
        arms_sorted = arms[order]
        w = torch.cat([x[order], self.arm_features[arms_sorted], e[order]], dim=-1)  # w_{i, Phi*_i}, [B, d]
        n_k = torch.bincount(arms, minlength=k)
        n_max = int(n_k.max())
        slot = torch.arange(batch, device=self.device) - (torch.cumsum(n_k, 0) - n_k)[arms_sorted]
        w_pad = w.new_zeros(k, n_max, d)
        r_pad = w.new_zeros(k, n_max)
        w_pad[arms_sorted, slot] = w
        r_pad[arms_sorted, slot] = r[order]

        # line 8: A_k <- A_k + sum_i w_i w_i^T ; line 9: b_k <- b_k + sum_i r_i w_i
        self.A += w_pad.transpose(1, 2) @ w_pad
        self.b += torch.einsum("knd,kn->kd", w_pad, r_pad)
        self.counts += n_k
        self._since_refresh += n_k

        touched = n_k > 0
        if n_max > max(1, d // 4):
            # Woodbury costs ~2 d^2 n + 3 n^2 d flops against ~d^3 for an exact Cholesky refresh, so beyond
            # n ~ d/4 new rows per arm the refresh is both cheaper and exact.
            refresh = touched
        else:
            idx = touched.nonzero().squeeze(-1)
            wt, a_inv = w_pad[idx], self.A_inv[idx]  # [T, n, d], [T, d, d]
            # Woodbury: (A + W^T W)^{-1} = A^{-1} - A^{-1} W^T (I + W A^{-1} W^T)^{-1} W A^{-1}
            u = a_inv @ wt.transpose(1, 2)  # [T, d, n]
            s = torch.eye(n_max, dtype=_F64, device=self.device) + wt @ u  # [T, n, n], SPD
            ut = u.transpose(1, 2).contiguous()  # [T, n, d]
            a_inv = a_inv - u @ torch.cholesky_solve(ut, torch.linalg.cholesky(s))
            self.A_inv[idx] = 0.5 * (a_inv + a_inv.transpose(1, 2))  # keep it exactly symmetric
            if self.refresh_every is None:
                refresh = torch.zeros_like(touched)
            else:
                refresh = touched & (self._since_refresh >= self.refresh_every)
        if bool(refresh.any()):
            self.A_inv[refresh] = _chol_inverse(self.A[refresh])
            self._since_refresh[refresh] = 0

    def replace_arm_features(self, arm_features: Tensor) -> None:
        """New arm features ``z_k`` ``[K, dz]`` for the next rounds (``dht.features.refresh``); ``A``, ``b`` stay.

        The past rounds stay in ``A_k``, ``b_k`` with the ``z_k`` they were played with: with disjoint
        parameters ``z_k`` is a per-arm constant, so ``theta_k``'s z-part has acted as the arm's intercept. Seen
        with the new ``z'_k``, the part of ``z'_k`` along the old ``z_k`` keeps that estimate and the part
        orthogonal to it has only the ridge prior (mean 0, a full exploration bonus): the arm is explored again
        in proportion to how far its feature moved (docs/training.md, T14).
        """
        z = _to64(arm_features, self.device)
        if tuple(z.shape) != (self.num_arms, self.arm_dim):
            raise ValueError(f"arm_features must be [{self.num_arms}, {self.arm_dim}], got {tuple(z.shape)}")
        self.arm_features = z.clone()

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """All state as tensors (safetensors / torch.save friendly), including the RNG state."""
        return {
            "A": self.A.clone(),
            "b": self.b.clone(),
            "A_inv": self.A_inv.clone(),
            "counts": self.counts.clone(),
            "since_refresh": self._since_refresh.clone(),
            "arm_features": self.arm_features.clone(),
            "alpha": torch.tensor(self.alpha, dtype=_F64),
            "lam": torch.tensor(self.lam, dtype=_F64),
            "refresh_every": torch.tensor(-1 if self.refresh_every is None else self.refresh_every),
            "rng_state": self.generator.get_state().clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        k, d = self.num_arms, self.dim
        if tuple(state["A"].shape) != (k, d, d) or tuple(state["arm_features"].shape) != (k, self.arm_dim):
            raise ValueError(
                f"state is for A {tuple(state['A'].shape)}, arm_features {tuple(state['arm_features'].shape)}; "
                f"this bandit has K={k}, d={d}, dz={self.arm_dim}"
            )
        self.A = _to64(state["A"], self.device).clone()
        self.b = _to64(state["b"], self.device).clone()
        self.A_inv = _to64(state["A_inv"], self.device).clone()
        self.counts = state["counts"].to(device=self.device, dtype=torch.int64).clone()
        self._since_refresh = state["since_refresh"].to(device=self.device, dtype=torch.int64).clone()
        self.arm_features = _to64(state["arm_features"], self.device).clone()
        self.alpha = float(state["alpha"])
        self.lam = float(state["lam"])
        refresh_every = int(state["refresh_every"])
        self.refresh_every = None if refresh_every < 0 else refresh_every
        self.generator.set_state(state["rng_state"].cpu().clone())


# ----------------------------------------------------------------------------------------------------------
# TSB: paper Section 3.2, Chapelle & Li (2011) Algorithm 3, combinatorial semi-bandit feedback
# ----------------------------------------------------------------------------------------------------------
class LogisticThompsonHeads:
    """Thompson sampling semi-bandit over N_H heads (TSB, Section 3.2).

    Each head h (base arm) has an online Bayesian logistic regression with a diagonal Gaussian posterior
    ``N(m_h, diag(1 / q_h))``, prior ``m = 0``, ``q = lam`` (Chapelle & Li 2011, Algorithm 3).

    * select: draw ``w_h ~ N(m_h, alpha^2 / q_h)`` (greedy: ``w_h = m_h``), score ``sigmoid(w_h^T v_{i,h})``
      and keep the k best heads of each sample (the superarm Phi*, Section 3.2).
    * update: for each chosen head, find ``w = argmin 0.5 sum_i q_i (w_i - m_i)^2
      + sum_j log(1 + exp(-y_j w^T v_j))`` (Newton with backtracking, vectorised over heads), then
      ``m = w`` and ``q_i += sum_j v_ij^2 p_j (1 - p_j)``. Unchosen heads get no feedback (semi-bandit,
      Wang & Chen 2018 / CombLinTS).

    Feature vector ``v_{i,h}``: ``[x_i ; 1]`` by default (context plus a bias, per-head weights; size 12 + 1 =
    13 as in Section 7.3). With ``use_arm_features=True`` it is ``[x_i ; z_h]`` (context plus the head's arm
    feature); with per-head weights z_h is a constant per head, so it only re-parameterises the bias.
    """

    def __init__(
        self,
        num_heads: int,
        context_dim: int,
        *,
        alpha: float = 1.0,
        lam: float = 1.0,
        use_arm_features: bool = False,
        arm_features: Tensor | None = None,
        newton_steps: int = 25,
        tol: float = 1e-10,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if lam <= 0:
            raise ValueError(f"lam (prior precision) must be > 0, got {lam}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.device = torch.device(device)
        self.num_heads = int(num_heads)
        self.context_dim = int(context_dim)
        self.use_arm_features = bool(use_arm_features)
        if self.use_arm_features:
            if arm_features is None:
                raise ValueError("use_arm_features=True needs arm_features [N_H, dz]")
            z = _to64(arm_features, self.device)
            if z.dim() != 2 or z.shape[0] != self.num_heads:
                raise ValueError(f"arm_features must be [{self.num_heads}, dz], got {tuple(z.shape)}")
        else:
            z = torch.ones(self.num_heads, 1, dtype=_F64, device=self.device)  # the bias column
        self.arm_features = z
        self.dim = self.context_dim + z.shape[1]
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.newton_steps = int(newton_steps)
        self.tol = float(tol)
        self.m = torch.zeros(self.num_heads, self.dim, dtype=_F64, device=self.device)
        self.q = torch.full((self.num_heads, self.dim), self.lam, dtype=_F64, device=self.device)
        self.counts = torch.zeros(self.num_heads, dtype=torch.int64, device=self.device)  # feedback per head
        self.generator = _make_generator(seed, self.device)

    def features(self, contexts: Tensor) -> Tensor:
        """Per (sample, head) vectors ``v_{i,h}``: ``[B, N_H, d]``."""
        x = _to64(contexts, self.device)
        if x.dim() != 2 or x.shape[1] != self.context_dim:
            raise ValueError(f"contexts must be [B, {self.context_dim}], got shape {tuple(x.shape)}")
        batch, n_h = x.shape[0], self.num_heads
        return torch.cat(
            [x[:, None, :].expand(batch, n_h, -1), self.arm_features[None].expand(batch, n_h, -1)], dim=-1
        )

    def scores(self, contexts: Tensor, greedy: bool = False) -> Tensor:
        """Estimated success probabilities ``E_{i,h} = sigmoid(p_{i,h}^T v_{i,h})``, ``[B, N_H]``.

        One independent posterior draw per sample and head (each sample is its own Thompson decision).
        """
        v = self.features(contexts)
        if greedy:
            w = self.m.expand_as(v)
        else:
            noise = torch.randn(v.shape, generator=self.generator, device=self.device, dtype=_F64)
            w = self.m + self.alpha * noise / self.q.sqrt()  # p ~ N(m, alpha^2 / q)
        return torch.sigmoid((w * v).sum(-1))

    def select(
        self,
        contexts: Tensor,
        k: int | Tensor,
        greedy: bool = False,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """Superarm per sample: the ``k`` heads (``int`` or ``[B]``) with the highest scores, ``[B, N_H]`` bool."""
        e = self.scores(contexts, greedy)
        batch, n_h = e.shape
        k_t = torch.as_tensor(k, device=self.device).long().reshape(-1).expand(batch)  # int or [B] -> [B]
        if bool((k_t < 0).any()) or bool((k_t > n_h).any()):
            raise ValueError(f"k must lie in [0, {n_h}]")
        mask = _allowed_mask(allowed, batch, n_h, self.device)
        if mask is not None:
            if bool((mask.sum(-1) < k_t).any()):
                raise ValueError("a sample has fewer allowed heads than k")
            e = e.masked_fill(~mask, float("-inf"))
        # Rank heads by score, ties (greedy at the prior: all 0.5) in a random order from our generator.
        perm = torch.rand(e.shape, generator=self.generator, device=self.device).argsort(dim=-1)
        ranked = perm.gather(1, e.gather(1, perm).argsort(dim=-1, descending=True, stable=True))
        keep = torch.arange(n_h, device=self.device)[None, :] < k_t[:, None]  # rank < k
        return torch.zeros(batch, n_h, dtype=torch.bool, device=self.device).scatter(1, ranked, keep)

    def _objective(self, w: Tensor, v: Tensor, y_pm: Tensor, c: Tensor) -> Tensor:
        """Per-head negative log posterior 0.5 sum q (w - m)^2 + sum_j c_j log(1 + exp(-y_j w^T v_j))."""
        logits = (w[None] * v).sum(-1)  # [B, N_H]
        nll = (c * torch.nn.functional.softplus(-y_pm * logits)).sum(0)
        return 0.5 * (self.q * (w - self.m) ** 2).sum(-1) + nll

    def update(self, contexts: Tensor, chosen: Tensor, rewards: Tensor) -> None:
        """Semi-bandit feedback: every chosen head of sample i observes its reward (0/1).

        ``rewards`` is ``[B]`` (one reward for the sample's superarm, credited to each of its heads: the DHT
        case) or ``[B, N_H]`` (one reward per head; entries of unchosen heads are ignored).
        """
        v = self.features(contexts)  # [B, N_H, d]
        batch, n_h = v.shape[:2]
        c = torch.as_tensor(chosen, device=self.device).bool()
        if c.shape != (batch, n_h):
            raise ValueError(f"chosen must be [B, N_H] = {(batch, n_h)}, got {tuple(c.shape)}")
        y = _to64(rewards, self.device)
        if y.shape == (batch,):
            y = y[:, None].expand(batch, n_h)
        if y.shape != (batch, n_h):
            raise ValueError(f"rewards must be [B] or [B, N_H], got {tuple(y.shape)}")
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("TSB rewards must be 0 or 1")
        cf = c.to(_F64)
        y_pm = 2.0 * y - 1.0  # {0, 1} -> {-1, +1} as in Chapelle & Li's log(1 + exp(-y w^T x))
        # MAP fit: Newton's method on the strictly convex objective, all heads at once. A head without
        # feedback has gradient 0 at w = m and does not move.
        w = self.m.clone()
        obj = self._objective(w, v, y_pm, cf)
        for _ in range(self.newton_steps):
            p = torch.sigmoid((w[None] * v).sum(-1))  # [B, N_H]
            grad = self.q * (w - self.m) + torch.einsum("bh,bhd->hd", cf * (p - y), v)
            hess = torch.diag_embed(self.q) + torch.einsum("bh,bhd,bhe->hde", cf * p * (1 - p), v, v)
            step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)  # [N_H, d]
            if float(step.abs().max()) < self.tol:
                break
            # Backtracking (Armijo) per head: plain Newton can overshoot on the logistic loss.
            t = torch.ones(n_h, dtype=_F64, device=self.device)
            decrease = (grad * step).sum(-1)
            for _ in range(30):
                new_obj = self._objective(w - t[:, None] * step, v, y_pm, cf)
                ok = new_obj <= obj - 1e-4 * t * decrease
                if bool(ok.all()):
                    break
                t = torch.where(ok, t, 0.5 * t)
            w = w - t[:, None] * step
            obj = self._objective(w, v, y_pm, cf)

        # Laplace approximation: m <- w, q_i <- q_i + sum_j v_ij^2 p_j (1 - p_j), chosen (head, sample) only.
        p = torch.sigmoid((w[None] * v).sum(-1))
        self.q = self.q + torch.einsum("bh,bhd->hd", cf * p * (1 - p), v * v)
        self.m = w
        self.counts += c.sum(0)

    def replace_arm_features(self, arm_features: Tensor) -> None:
        """New head features ``z_h`` ``[N_H, dz]`` (``use_arm_features=True`` only; ``dht.features.refresh``).
        The posterior (m, q) stays; as in :meth:`LinUCB.replace_arm_features`, its z-part has acted as a
        per-head bias learned with the old ``z_h``."""
        if not self.use_arm_features:
            raise ValueError("this TSB was built with use_arm_features=False: its feature is the constant 1")
        z = _to64(arm_features, self.device)
        if tuple(z.shape) != tuple(self.arm_features.shape):
            raise ValueError(f"arm_features must be {tuple(self.arm_features.shape)}, got {tuple(z.shape)}")
        self.arm_features = z.clone()

    def state_dict(self) -> dict[str, Tensor]:
        """All state as tensors (safetensors / torch.save friendly), including the RNG state."""
        return {
            "m": self.m.clone(),
            "q": self.q.clone(),
            "counts": self.counts.clone(),
            "arm_features": self.arm_features.clone(),
            "alpha": torch.tensor(self.alpha, dtype=_F64),
            "lam": torch.tensor(self.lam, dtype=_F64),
            "rng_state": self.generator.get_state().clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if tuple(state["m"].shape) != (self.num_heads, self.dim):
            raise ValueError(
                f"state is for m {tuple(state['m'].shape)}, expected {(self.num_heads, self.dim)}"
            )
        self.m = _to64(state["m"], self.device).clone()
        self.q = _to64(state["q"], self.device).clone()
        self.counts = state["counts"].to(device=self.device, dtype=torch.int64).clone()
        self.arm_features = _to64(state["arm_features"], self.device).clone()
        self.alpha = float(state["alpha"])
        self.lam = float(state["lam"])
        self.generator.set_state(state["rng_state"].cpu().clone())
