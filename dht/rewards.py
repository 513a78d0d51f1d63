"""The rewards of Section 4.3 that DHT's bandits (:mod:`dht.bandits`) learn from.

* :func:`reward_delta` -- the cost-weighted loss ``delta = loss * L (* H)``;
* :func:`ratio_reward` -- ``r = scale * mean(previous batch's delta) / delta`` (r_L, r_H, r_cp), with
  :class:`RewardBaseline` keeping the previous batch's mean per bandit (and per queue);
* :func:`ts_reward` -- the TSB's binary reward from r_H / r_cp;
* :func:`all_depths_reward`, :func:`difference_reward` -- every depth option's reward against the sample's own
  mean (T24, T25; not the paper's).

See ``docs/bandits.md`` for the readings of the paper taken here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["RewardBaseline", "all_depths_reward", "continue_rewards", "difference_reward", "ratio_reward", "reward_delta", "ts_reward"]

_F64 = torch.float64


def reward_delta(loss: Tensor, layers: Tensor | int, heads: Tensor | int | None = None,
                 cost_exponent: float = 1.0) -> Tensor:
    """Cost-weighted loss of Section 4.3: ``delta_L = loss * L`` and ``delta_H = delta_cp = loss * L * H``.

    ``loss`` is the per-sample loss (cross-entropy with ``reduction='none'``), detached. ``cost_exponent`` (gamma,
    not in the paper, which has 1) weighs the cost: ``loss * L**gamma (* H**gamma)``. With gamma = 1 a 6-layer arm
    beats a 2-layer one only when its loss is 3x lower; gamma = 0 rewards the loss alone (docs/training.md).
    """
    delta = loss.detach() * torch.as_tensor(layers, device=loss.device, dtype=loss.dtype) ** cost_exponent
    if heads is not None:
        delta = delta * torch.as_tensor(heads, device=loss.device, dtype=loss.dtype) ** cost_exponent
    return delta


def ratio_reward(
    delta: Tensor,
    previous_mean: float | None,
    scale: float,
    *,
    eps: float = 1e-8,
    clip: float | None = None,
) -> Tensor:
    """``r_i = scale * mean_j(delta_{t-1, j}) / delta_{t, i}`` (Section 4.3: r_L with alpha, r_H with beta_1,
    r_cp with beta_cp).

    * First batch (``previous_mean is None``, also the first batch of a new queue/key): there is nothing to
      compare with, so every sample gets the neutral reward ``scale`` (ratio 1).
    * Numerator and denominator are clamped to ``eps``: a zero loss gives a large but finite reward, and
      0 / 0 gives the neutral ratio 1. ``clip`` optionally caps the reward (keeps one near-zero loss from
      dominating the ridge regression).
    """
    delta = torch.as_tensor(delta)
    out_dtype = delta.dtype if delta.is_floating_point() else torch.float32
    if not bool(torch.isfinite(delta).all()) or bool((delta < 0).any()):
        raise ValueError("delta (loss x cost) must be finite and non-negative")
    if previous_mean is None:
        return torch.full(delta.shape, float(scale), dtype=out_dtype, device=delta.device)
    if not (previous_mean >= 0 and previous_mean < float("inf")):
        raise ValueError(f"previous_mean must be finite and non-negative, got {previous_mean}")
    ratio = max(float(previous_mean), eps) / delta.to(_F64).clamp_min(eps)
    reward = scale * ratio
    if clip is not None:
        reward = reward.clamp(max=clip)
    return reward.to(out_dtype)


def all_depths_reward(delta: Tensor, scale: float, *, eps: float = 1e-8, clip: float | None = None) -> Tensor:
    """Rewards of every depth option for every sample, ``delta`` [B, K] (``loss_k * L_k``, :func:`reward_delta`,
    from one no-grad pass read at every option's depth): ``r_ik = scale * mean_j(delta_ij) / delta_ik``, Section
    4.3's ratio with the sample's own mean over the options in place of the previous batch's mean
    (``depth_feedback: all_depths``, docs/training.md T24; not in the paper).

    The paper's baseline is another batch's mean, so how hard a sample is moves its reward as much as which depth
    it ran; against its own mean only the difference between depths is left, which is what UCB_L has to learn.
    Clamped to ``eps`` and capped by ``clip`` as :func:`ratio_reward`.
    """
    delta = torch.as_tensor(delta)
    if delta.dim() != 2:
        raise ValueError(f"delta must be [samples, options], got shape {tuple(delta.shape)}")
    if not bool(torch.isfinite(delta).all()) or bool((delta < 0).any()):
        raise ValueError("delta (loss x cost) must be finite and non-negative")
    d = delta.to(_F64).clamp_min(eps)
    reward = scale * d.mean(dim=1, keepdim=True) / d
    if clip is not None:
        reward = reward.clamp(max=clip)
    return reward


def difference_reward(losses: Tensor, layers: Tensor, price: float, scale: float = 1.0) -> Tensor:
    """Rewards of every depth option for every sample from its losses [B, K] at the options' depths ``layers`` [K]
    (``all_depths_reward: difference``, docs/training.md T25; not in the paper): ``r_ik = -scale * (c_ik -
    mean_j c_ij)`` with the cost ``c_ik = loss_ik + price * L_k``. A deeper option wins exactly when it saves more
    than ``price`` of loss per extra layer.

    Why not the ratio: ``loss * L`` makes depth pay where it divides the loss by the depth ratio, which happens
    most on samples the shallow exit already gets right (a small loss made smaller); a price per layer in loss
    units makes it pay where it lowers the loss by a fixed amount, which happens on the samples the shallow exit
    gets wrong (docs/real-text.md section 3 measures both).
    """
    losses = torch.as_tensor(losses)
    if losses.dim() != 2 or losses.shape[1] != len(layers):
        raise ValueError(f"losses must be [samples, {len(layers)} options], got shape {tuple(losses.shape)}")
    if not bool(torch.isfinite(losses).all()) or bool((losses < 0).any()):
        raise ValueError("losses must be finite and non-negative")
    cost = losses.to(_F64) + price * torch.as_tensor(layers, dtype=_F64)[None, :]
    return -scale * (cost - cost.mean(dim=1, keepdim=True))


def ts_reward(r: Tensor, threshold: float = 1.0, *, printed_cases: bool = False) -> Tensor:
    """Binary TSB reward from the head reward r_H (or r_cp), Section 4.3.

    Default (the text's intent): 1 when ``r > threshold``, i.e. this sample's loss x cost beat the previous
    batch's average, else 0. ``printed_cases=True`` takes the equation as printed instead (0 when
    ``r > threshold``, 1 when ``r <= threshold``); see ambiguity #1 in docs/bandits.md.
    With a reward scale ``beta != 1``, "beat the previous batch" is ``r > beta``: pass ``threshold=beta``.
    """
    r = torch.as_tensor(r)
    better = r > threshold
    out = ~better if printed_cases else better
    return out.to(r.dtype if r.is_floating_point() else torch.float32)


class RewardBaseline:
    """Previous-batch mean of delta, per key (Section 4.3's ``sum_j delta_{t-1, j} / bs``).

    The key says which stream the baseline belongs to, e.g. ``"ucb_l"``, ``"ucb_l/L6"`` (per L-queue) or
    ``"ucb_h/group1"`` (per layer group): the caller picks the granularity. A key never seen has no baseline
    and :meth:`reward` then applies the first-batch rule of :func:`ratio_reward`.
    """

    def __init__(self) -> None:
        self._means: dict[str, float] = {}

    def get(self, key: str) -> float | None:
        return self._means.get(key)

    def set(self, key: str, delta: Tensor) -> None:
        """Store this batch's mean delta as the baseline for the next batch of ``key``."""
        delta = torch.as_tensor(delta)
        if delta.numel() == 0:
            return
        self._means[key] = float(delta.detach().to(_F64).mean())

    def reward(
        self,
        key: str,
        delta: Tensor,
        scale: float,
        *,
        eps: float = 1e-8,
        clip: float | None = None,
    ) -> Tensor:
        """Ratio reward against the previous batch of ``key``, then make this batch the new baseline."""
        r = ratio_reward(delta, self.get(key), scale, eps=eps, clip=clip)
        self.set(key, delta)
        return r

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self._means.clear()
        else:
            self._means.pop(key, None)

    def keys(self) -> list[str]:
        return list(self._means)

    def state_dict(self) -> dict[str, Tensor]:
        return {key: torch.tensor(value, dtype=_F64) for key, value in self._means.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._means = {key: float(value) for key, value in state.items()}


def continue_rewards(errs: Tensor, depths: Sequence[int], price: float, how: str = "next",
                     scale: float = 1.0) -> Tensor:
    """What continuing is worth at each boundary of the sequential mode (docs/training.md T31; not in the paper),
    from each sample's error at every depth it may stop at, ``errs`` [B, K] at ``depths`` [K] (ascending): [B, K-1].

    ``next``: ``err_k - err_{k+1} - price x (d_{k+1} - d_k)``, the priced gain of one more group (T25's price per
    layer, T27's error). ``best``: ``err_k - min_{j>k} (err_j + price x (d_j - d_k))``, the gain of the best deeper
    stop (a group that does not help yet may lead to one that does). Stopping is worth 0: the reward of continuing
    is its gain over stopping here."""
    errs = torch.as_tensor(errs, dtype=_F64)
    d = torch.as_tensor(list(depths), dtype=_F64)
    if errs.dim() != 2 or errs.shape[1] != len(d) or len(d) < 2:
        raise ValueError(f"errs must be [samples, {len(d)} depths] with at least 2 depths, got {tuple(errs.shape)}")
    if how == "next":
        gain = errs[:, :-1] - errs[:, 1:] - price * (d[1:] - d[:-1])
    elif how == "best":
        cost = errs + price * d  # err_j + price d_j; minus price d_k below
        tail = torch.flip(torch.cummin(torch.flip(cost, [1]), dim=1).values, [1])  # min over j >= k
        gain = errs[:, :-1] - (tail[:, 1:] - price * d[:-1])
    else:
        raise ValueError(f"continue_reward must be 'next' or 'best', got {how!r}")
    return scale * gain
