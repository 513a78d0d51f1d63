"""The bandits of one DHT mode and the inference policy (Algorithm 2 without the training, Algorithm 3's queues).

:class:`Policy` holds UCB_L + UCB_H + TSB (tree search), UCB_cp + TSB (integrated search) or one fixed arm, and
turns states into decisions (Algorithm 2, lines 2-6 and 9-13) and losses into bandit updates (lines 15-16);
:class:`LayerQueue` is Algorithm 3's per-L queues; :func:`predict` is inference: S1 once (the weights no longer
change, so it doubles as S2,0), the bandits act greedily (``dht.inference``) without updates, samples are
grouped by depth and each group runs only its layers and its kept heads (sliced), so the savings are real.
The training loop around them is :mod:`dht.trainer`. Readings of the paper: docs/training.md.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dht.arm_features import arm_layer_heads, arm_matrix
from dht.arms import parse_arm
from dht.bandits import LinUCB, LogisticThompsonHeads
from dht.config import Config, ModeSpec, mode_bandits
from dht.contexts import RunningNormalizer, multi_granularity_pool
from dht.evaluation import Predictions, SplitData
from dht.flops import exit_read_flops, forward_flops
from dht.model import DHTForSequenceClassification
from dht.rewards import (
    RewardBaseline,
    all_depths_reward,
    continue_rewards,
    difference_reward,
    reward_delta,
    ts_reward,
)
from dht.walk import At, Next, path_points, start, walk

# --------------------------------------------------------------------------------------------------------------
# The bandits of one mode
# --------------------------------------------------------------------------------------------------------------


def exit_uncertainty(model: DHTForSequenceClassification, s1: Tensor, mask: Tensor) -> Tensor:
    """1 - the top-class probability of the model's classifier read on S1 [B] (the exit head after the b fixed
    layers: the shared one, or b's own with per-depth heads; T23). The caller sets the mode and the gradient (S1's:
    eval, none)."""
    keep = None if bool(mask.all()) else mask.bool()
    return 1.0 - model.classify(s1, keep, model.config.fixed_layers).float().softmax(-1).max(-1).values


#: The exit statistics of the sequential mode's stop context (T31), after the pooled state: FastBERT's signal and
#: two more readings of the same distribution.
EXIT_STATS = ("top_probability", "margin", "normalised_entropy")


def exit_statistics(logits: Tensor) -> Tensor:
    """[B, 3]: the exit's top-class probability, its margin over the second class and the entropy of its
    distribution divided by log(classes) (1: uniform), read from ``logits`` [B, C] (T31)."""
    p = logits.float().softmax(-1)
    n = p.shape[-1]
    top = p.topk(min(2, n), dim=-1).values
    margin = top[:, 0] - top[:, 1] if n > 1 else top[:, 0]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / max(torch.log(torch.tensor(float(n))).item(), 1e-12)
    return torch.stack([top[:, 0], margin, entropy], dim=1)


@dataclass
class Decision:
    """What the policy chose for the samples of one queue batch, kept for the rewards."""

    arm: Tensor  # [B] index into the layer options (tree) or the arms (integrated); -1 for fixed
    context: Tensor  # [B, F_L] normalised S1 context of UCB_L / UCB_cp
    layers: int  # L, shared by the batch (one queue)


class Policy:
    """UCB_L + UCB_H + TSB (tree search), UCB_cp + TSB (integrated search), or one fixed arm (12-VaBERT).

    Arms in `integrated` and `fixed` modes are sequences of (layers, heads) segments (Section 6.1); the first b
    layers always keep every head.
    """

    def __init__(self, cfg: Config, mode: ModeSpec, arm_features: dict[str, Tensor], model_config: Any):
        self.cfg = cfg
        self.mode = mode
        self.bandit_cfg = mode_bandits(cfg.dht.bandits, mode)  # dht.bandits with the mode's own reward settings
        self.search = mode.search
        self.b = cfg.dht.fixed_layers
        self.n_heads = model_config.num_attention_heads
        self.groups = model_config.dynamic_layer_groups()
        bc = self.bandit_cfg
        feats = cfg.dht.features
        self.pool_l = feats.ucb_cp if self.search == "integrated" else feats.ucb_l
        self.pool_h = feats.ucb_h
        self.pool_t = feats.tsb
        # T23: the shallow exit's uncertainty as one more context entry of UCB_L / UCB_cp (normalised with it)
        self.exit_confidence = feats.exit_confidence and self.search not in ("fixed", "sequential")
        self.context_size = self.pool_l.size + int(self.exit_confidence)
        self.norm_l = RunningNormalizer(self.context_size)
        # One normaliser per dynamic group for the UCB_H and TSB contexts: group o sees states of depth b + o c,
        # whose scale and spread differ (docs/training.md, T18).
        self.norm_h = [RunningNormalizer(self.pool_h.size) for _ in self.groups]
        self.norm_t = [RunningNormalizer(self.pool_t.size) for _ in self.groups]
        self.baseline = RewardBaseline()
        seed = cfg.training_seed
        self.ucb: LinUCB | None = None
        self.ucb_h: LinUCB | None = None
        self.tsb: LogisticThompsonHeads | None = None
        if self.search in ("tree", "sequential"):
            self.layer_options = list(mode.layers or [])
            self.head_options = list(mode.heads or [])
            if self.search == "tree":
                self.ucb = LinUCB(arm_matrix(arm_features, "ucb_l", self.layer_options), self.context_size,
                                  alpha=bc.ucb_alpha, lam=bc.ucb_lambda, seed=seed)
            self.ucb_h = LinUCB(arm_matrix(arm_features, "ucb_h", self.head_options), self.pool_h.size,
                                extra_dim=len(self.groups), alpha=bc.ucb_alpha, lam=bc.ucb_lambda, seed=seed + 1)
            self.arm_heads: list[list[int]] = []
        else:
            self.arms = [str(parse_arm(a)) for a in mode.arms or []]
            self.arm_heads = [arm_layer_heads(parse_arm(a), self.b, self.n_heads) for a in self.arms]
            self.layer_options = sorted({len(h) for h in self.arm_heads})
            if self.search == "integrated":
                self.ucb = LinUCB(arm_matrix(arm_features, "ucb_cp", self.arms), self.context_size,
                                  alpha=bc.ucb_alpha, lam=bc.ucb_lambda, seed=seed)
        # The sequential mode's stop-or-continue bandits (T31): one LinUCB per boundary (every depth it may stop at
        # but the deepest), arms (stop, continue) with one intercept each (z = the identity: the contexts are
        # normalised to mean 0), each boundary's contexts normalised by its own statistics (as T18's groups).
        self.stop_context_size = self.pool_l.size + len(EXIT_STATS)
        boundaries = len(self.layer_options) - 1 if self.search == "sequential" else 0
        self.norm_s = [RunningNormalizer(self.stop_context_size) for _ in range(boundaries)]
        self.ucb_s = [LinUCB(torch.eye(2), self.stop_context_size, alpha=bc.ucb_alpha, lam=bc.ucb_lambda,
                             seed=seed + 3 + k) for k in range(boundaries)]
        # The price per layer the stop decisions are taken at (T31's dial): the training's, until the train stage
        # sets the one chosen on the validation split from the mode's `prices` (dht.curves); kept with the bandits.
        self.stop_price = float(bc.depth_price)
        if self.search != "fixed":
            tsb_z = arm_matrix(arm_features, "tsb", range(self.n_heads)) if bc.tsb_arm_features else None
            self.tsb = LogisticThompsonHeads(self.n_heads, self.pool_t.size, alpha=bc.ts_alpha, lam=bc.ts_lambda,
                                             use_arm_features=bc.tsb_arm_features, arm_features=tsb_z,
                                             seed=seed + 2)

    def forget_depths(self) -> None:
        """``depth_memory: epoch`` (docs/training.md, T28): UCB_L / UCB_cp start again from Algorithm 1, line 1
        (A = lambda I, b = 0), with the arm features they have now; the context normaliser, UCB_H, the TSB and the
        reward baselines keep their state. The sequential mode's stop bandits alike (T31)."""
        self.ucb_s = [LinUCB(old.arm_features, old.context_dim, alpha=old.alpha, lam=old.lam,
                             refresh_every=old.refresh_every, seed=self.cfg.training_seed + 3 + k, device=old.device)
                      for k, old in enumerate(self.ucb_s)]
        if self.ucb is None:
            return
        old = self.ucb
        self.ucb = LinUCB(old.arm_features, old.context_dim, alpha=old.alpha, lam=old.lam,
                          refresh_every=old.refresh_every, seed=self.cfg.training_seed, device=old.device)

    @property
    def uses_s1(self) -> bool:
        return self.search not in ("fixed", "sequential")  # sequential decides on the way, not from S1

    # ---- Algorithm 2, lines 2-6: the depth from S1 ------------------------------------------------------------

    def choose_arms(self, s1: Tensor | None, mask: Tensor, batch: int, greedy: bool, learn: bool,
                    uncertainty: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(arm index [B], normalised context [B, F]) for `batch` samples; `uncertainty` [B] is the shallow exit's
        (:func:`exit_uncertainty`), required when the policy uses it (T23)."""
        return self.decide_arms(self.arm_context(s1, mask, uncertainty), batch, greedy=greedy, learn=learn)

    def arm_context(self, s1: Tensor | None, mask: Tensor, uncertainty: Tensor | None = None) -> Tensor | None:
        """UCB_L's / UCB_cp's pooled S1 context [B, F] on the CPU, not yet normalised (None without a bandit), with
        the shallow exit's uncertainty as its last entry when the policy reads it (T23)."""
        if self.ucb is None:
            return None
        x = multi_granularity_pool(s1.float(), mask, self.pool_l).cpu()
        if self.exit_confidence:
            if uncertainty is None:
                raise ValueError("this policy reads the shallow exit's uncertainty (dht.features.exit_confidence)")
            x = torch.cat([x, uncertainty.float().cpu()[:, None]], dim=1)
        return x

    def decide_arms(self, x: Tensor | None, batch: int, greedy: bool, learn: bool) -> tuple[Tensor, Tensor]:
        """:meth:`choose_arms` from pooled contexts (a distributed run pools on each rank, decides on all rows)."""
        if self.ucb is None:
            return torch.zeros(batch, dtype=torch.long), torch.zeros(batch, 0)
        x = self.norm_l(x, update=learn)
        return self.ucb.select(x, greedy=greedy), x

    def layers_of(self, arm: Tensor) -> Tensor:
        if self.search == "sequential":  # one queue: every sample may walk to the deepest depth
            return torch.full(arm.shape, max(self.layer_options), dtype=torch.long)
        if self.search == "tree":
            return torch.tensor(self.layer_options)[arm]
        return torch.tensor([len(self.arm_heads[a]) for a in arm.tolist()], dtype=torch.long)

    # ---- Algorithm 2, lines 9-13: the heads of one group from the state reached so far ----------------------

    def choose_heads(self, g: int, state: Tensor, mask: Tensor, arm: Tensor, greedy: bool, learn: bool) -> dict[str, Any]:
        """Per-layer head plan [B, len(group), N_H] for dynamic group g, and what the rewards need.

        ``state`` is the hidden state entering the group; its contexts are normalised by group g's own running
        statistics (updated first when ``learn``)."""
        return self.decide_heads(g, *self.head_contexts(state, mask), arm, greedy=greedy, learn=learn)

    def head_contexts(self, state: Tensor, mask: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The TSB's and (tree search) UCB_H's pooled contexts [B, F] of a state entering a group, on the CPU, not
        yet normalised (None where the mode has no such bandit)."""
        if self.search == "fixed":
            return None, None
        xt = multi_granularity_pool(state.float(), mask, self.pool_t).cpu()
        with_h = self.search in ("tree", "sequential")
        return xt, multi_granularity_pool(state.float(), mask, self.pool_h).cpu() if with_h else None

    def decide_heads(self, g: int, xt: Tensor | None, xh: Tensor | None, arm: Tensor, greedy: bool,
                     learn: bool) -> dict[str, Any]:
        """:meth:`choose_heads` from pooled contexts (a distributed run pools on each rank, decides on all rows)."""
        group = self.groups[g]
        batch = arm.shape[0]
        if self.search == "fixed":
            heads = torch.tensor([self.arm_heads[a][group.start : group.stop] for a in arm.tolist()])
            return {"plan": _first_k(heads, self.n_heads), "counts": heads}
        xt = self.norm_t[g](xt, update=learn)
        out: dict[str, Any] = {"xt": xt}
        if self.search in ("tree", "sequential"):
            xh = self.norm_h[g](xh, update=learn)
            e = torch.zeros(batch, len(self.groups))
            e[:, g] = 1.0
            h_idx = self.ucb_h.select(xh, extra=e, greedy=greedy)
            k = torch.tensor(self.head_options)[h_idx]
            counts = k[:, None].expand(batch, len(group)).clone()
            out.update(xh=xh, e=e, h_idx=h_idx)
        else:
            counts = torch.tensor([self.arm_heads[a][group.start : group.stop] for a in arm.tolist()])
            k = counts[:, 0]
        chosen = self.tsb.select(xt, k, greedy=greedy)  # [B, N_H]
        # Layers of the group that keep more heads than the TSB chose (P-DHT's full tail layers) keep all.
        plan = chosen[:, None, :].expand(batch, len(group), self.n_heads).clone()
        plan |= counts[:, :, None] >= self.n_heads
        out.update(plan=plan, chosen=chosen, k=k, counts=counts)
        return out

    # ---- Algorithm 2, lines 15-16: rewards (Section 4.3) and updates ------------------------------------------

    def learn(self, decision: Decision, groups: list[dict[str, Any]], loss: Tensor,
              depth_losses: Tensor | None = None) -> None:
        """Rewards (Section 4.3) from the batch's per-sample `loss` and every bandit's update. `depth_losses` [B, K]:
        each sample's loss read at every depth option (``depth_feedback: all_depths``, T24), from which UCB_L
        learns every option instead of the chosen one."""
        if self.search == "fixed":
            return
        bc = self.bandit_cfg
        loss = loss.detach().double().cpu()
        layers = torch.full_like(loss, float(decision.layers))
        key = f"/L{decision.layers}" if bc.reward_baseline == "per_queue" else ""
        printed = bc.ts_reward_sign == "printed"
        if self.search == "tree":
            key_l = "ucb_l" + key
            first = self.baseline.get(key_l) is None
            r_l = self.baseline.reward(key_l, reward_delta(loss, layers, cost_exponent=bc.cost_exponent), bc.reward_alpha, clip=bc.reward_clip)
            if depth_losses is None:
                self.ucb.update(decision.context, decision.arm, r_l)
            else:
                self._learn_all_depths(decision.context, depth_losses)
            del first  # UCB_L learns from the neutral first reward too (a ridge regression, not a binary model)
            self._learn_heads(groups, loss, layers, key)
        else:
            heads = torch.tensor([float(_dynamic_heads(self.arm_heads[a], self.b)) for a in decision.arm.tolist()],
                                 dtype=torch.float64)
            key_cp = "ucb_cp" + key
            first = self.baseline.get(key_cp) is None
            r_cp = self.baseline.reward(key_cp, reward_delta(loss, layers, heads, cost_exponent=bc.cost_exponent), bc.reward_beta_cp, clip=bc.reward_clip)
            self.ucb.update(decision.context, decision.arm, r_cp)
            if not first:
                r_ts = ts_reward(r_cp, bc.reward_beta_cp, printed_cases=printed)
                for info in groups:
                    self.tsb.update(info["xt"], info["chosen"], r_ts)

    def _learn_heads(self, groups: list[dict[str, Any]], loss: Tensor, layers: Tensor, key: str = "",
                     reached: list[Tensor] | None = None) -> None:
        """UCB_H's and the TSB's updates (Section 4.3: r_H from loss x L x H against the previous batch), group by
        group; ``reached`` [B] bool per group: the rows whose path ran it (None: every row)."""
        bc = self.bandit_cfg
        printed = bc.ts_reward_sign == "printed"
        for g, info in enumerate(groups):
            rows = slice(None) if reached is None else reached[g]
            if reached is not None and not bool(rows.any()):
                continue
            key_h = f"ucb_h/g{g}" + key
            first_h = self.baseline.get(key_h) is None
            delta = reward_delta(loss[rows], layers[rows], info["k"][rows].double(), cost_exponent=bc.cost_exponent)
            r_h = self.baseline.reward(key_h, delta, bc.reward_beta_h, clip=bc.reward_clip)
            self.ucb_h.update(info["xh"][rows], info["h_idx"][rows], r_h, extra=info["e"][rows])
            if not first_h:  # a neutral first-batch reward carries no information for a binary learner
                self.tsb.update(info["xt"][rows], info["chosen"][rows],
                                ts_reward(r_h, bc.reward_beta_h, printed_cases=printed))

    # ---- the sequential mode (T31): stop or continue at every boundary ------------------------------------------

    def stop_context(self, state: Tensor, mask: Tensor, logits: Tensor) -> Tensor:
        """A boundary's stop context [B, F] on the CPU, not yet normalised: the pooled state there (UCB_L's pooling)
        and its exit's statistics (:func:`exit_statistics`)."""
        pooled = multi_granularity_pool(state.float(), mask, self.pool_l).cpu()
        return torch.cat([pooled, exit_statistics(logits).cpu()], dim=1)

    def decide_stops(self, k: int, x: Tensor, greedy: bool, learn: bool) -> tuple[Tensor, Tensor]:
        """(stop [B] bool, normalised context [B, F]) at boundary k (the k-th depth of ``layer_options``) from
        :meth:`stop_context`'s contexts (a distributed run gathers every rank's first)."""
        x = self.norm_s[k](x, update=learn)
        shift = self.stop_price - self.bandit_cfg.depth_price
        if shift == 0.0:  # at the training's price (always while training): the bandit's own choice
            return self.ucb_s[k].select(x, greedy=greedy) == 0, x
        # Another price per layer: continuing's estimated reward err_k - err_{k+1} - price x (d_{k+1} - d_k), scaled
        # by reward_alpha, is linear in the price with a known slope, so the bandit's estimate at the training's
        # price moves by that slope x the difference (exact for continue_reward: next, the one the check allows)
        scores = self.ucb_s[k].scores(x, greedy=greedy)
        added = self.layer_options[k + 1] - self.layer_options[k]
        scores[:, 1] -= self.bandit_cfg.reward_alpha * shift * added
        return scores[:, 1] <= scores[:, 0], x

    def learn_sequential(self, contexts: list[Tensor], errs: Tensor, groups: list[dict[str, Any]], loss: Tensor,
                         depth: Tensor) -> None:
        """The sequential mode's updates (T31). Every boundary's bandit learns from every sample, full information:
        continuing is worth :func:`dht.rewards.continue_rewards` of its errors at every depth (``errs`` [B, K], from
        the step's no-grad pass), stopping 0. UCB_H and the TSB learn as in the tree mode from the loss at the
        sample's stop (``loss`` [B]) and its depth (``depth`` [B]), on the rows whose path ran each group."""
        bc = self.bandit_cfg
        gain = continue_rewards(errs.detach().cpu(), self.layer_options, bc.depth_price, self.mode.continue_reward,
                                bc.reward_alpha)
        for k, x in enumerate(contexts):
            n = x.shape[0]
            arms = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
            self.ucb_s[k].update(torch.cat([x, x]), arms, torch.cat([torch.zeros(n, dtype=torch.float64), gain[:, k]]))
        depth = depth.double().cpu()
        self._learn_heads(groups, loss.detach().double().cpu(), depth,
                          reached=[depth > group.start for group in self.groups[: len(groups)]])

    def _learn_all_depths(self, context: Tensor, depth_losses: Tensor) -> None:
        """UCB_L's full-information update (T24): every option k of every sample, with the reward of
        :func:`dht.rewards.all_depths_reward` on ``loss_k * L_k**gamma`` or
        :func:`dht.rewards.difference_reward` (``all_depths_reward`` of the mode or dht.bandits, T25). The batch baseline of the chosen-arm
        reward is still kept (above), so switching this off mid-run would continue from a current one."""
        bc = self.bandit_cfg
        n, k = depth_losses.shape
        losses, depths = depth_losses.detach().double().cpu(), torch.tensor(self.layer_options, dtype=torch.float64)
        if bc.all_depths_reward == "difference":  # T25
            rewards = difference_reward(losses, depths, bc.depth_price, bc.reward_alpha)
        else:
            delta = reward_delta(losses, depths, cost_exponent=bc.cost_exponent)
            rewards = all_depths_reward(delta, bc.reward_alpha, clip=bc.reward_clip)
        self.ucb.update(context.repeat_interleave(k, dim=0), torch.arange(k).repeat(n), rewards.reshape(-1))

    # ---- persistence ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"norm_l": self.norm_l.state_dict(),
                                 "norm_h": [norm.state_dict() for norm in self.norm_h],
                                 "norm_t": [norm.state_dict() for norm in self.norm_t],
                                 "baseline": self.baseline.state_dict()}
        for name in ("ucb", "ucb_h", "tsb"):
            bandit = getattr(self, name)
            if bandit is not None:
                state[name] = bandit.state_dict()
        if self.ucb_s:
            state["norm_s"] = [norm.state_dict() for norm in self.norm_s]
            state["ucb_s"] = [bandit.state_dict() for bandit in self.ucb_s]
            state["stop_price"] = self.stop_price
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norm_l.load_state_dict(state["norm_l"])
        for name in ("norm_h", "norm_t"):
            saved, norms = state[name], getattr(self, name)
            if not isinstance(saved, list) or len(saved) != len(norms):
                raise ValueError(
                    f"policy state has {'one' if isinstance(saved, dict) else len(saved)} {name} normaliser(s), "
                    f"this policy one per dynamic group ({len(norms)}): it was written by an older version "
                    "(one normaliser for every group) or another model; retrain"
                )
            for norm, norm_state in zip(norms, saved, strict=True):
                norm.load_state_dict(norm_state)
        self.baseline.load_state_dict(state["baseline"])
        for name in ("ucb", "ucb_h", "tsb"):
            bandit = getattr(self, name)
            if bandit is not None:
                bandit.load_state_dict(state[name])
        if len(state.get("ucb_s", [])) != len(self.ucb_s):
            raise ValueError(f"policy state has {len(state.get('ucb_s', []))} stop bandits, this policy "
                             f"{len(self.ucb_s)} (one per boundary of a sequential mode): another mode's; retrain")
        for norm, bandit, norm_state, bandit_state in zip(self.norm_s, self.ucb_s, state.get("norm_s", []),
                                                          state.get("ucb_s", []), strict=True):
            norm.load_state_dict(norm_state)
            bandit.load_state_dict(bandit_state)
        if self.ucb_s:
            self.stop_price = float(state.get("stop_price", self.bandit_cfg.depth_price))

    def describe(self) -> dict[str, Any]:
        """What `dht predict` needs to rebuild this policy."""
        return {"search": self.search, "mode": self.mode.model_dump(mode="json"),
                "layer_options": self.layer_options, "arms": getattr(self, "arms", None)}


def _first_k(counts: Tensor, n_heads: int) -> Tensor:
    """Plan keeping the first k heads of each layer ([B, layers] counts -> [B, layers, N_H])."""
    return torch.arange(n_heads)[None, None, :] < counts[:, :, None]


def _dynamic_heads(heads: list[int], b: int) -> int:
    """The arm's H: the heads of its dynamic part (12 when it has none, as 3L12H)."""
    dynamic = heads[b:]
    return min(dynamic) if dynamic else heads[-1]


# --------------------------------------------------------------------------------------------------------------
# Queues (Algorithm 3)
# --------------------------------------------------------------------------------------------------------------


class LayerQueue:
    """One queue per depth L (Algorithm 3): samples wait with their decision until q of them share an L."""

    def __init__(self, size: int):
        self.size = size
        self.items: dict[int, list[tuple[int, int, Tensor]]] = defaultdict(list)

    def push(self, layers: int, index: int, arm: int, context: Tensor) -> list[tuple[int, int, Tensor]] | None:
        queue = self.items[layers]
        queue.append((index, arm, context))
        if len(queue) == self.size:
            self.items[layers] = []
            return queue
        return None

    def drain(self) -> list[tuple[int, list[tuple[int, int, Tensor]]]]:
        """Every partly filled queue, smallest L first (end of epoch: no sample may drop out)."""
        out = [(layers, q) for layers, q in sorted(self.items.items()) if q]
        self.items = defaultdict(list)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {str(k): [(i, a, c) for i, a, c in v] for k, v in self.items.items() if v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = defaultdict(list, {int(k): list(v) for k, v in state.items()})


# --------------------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: DHTForSequenceClassification, policy: Policy, data: SplitData, device: torch.device,
            batch_size: int, seq_len: int, greedy: bool = True) -> Predictions:
    """The inference policy: S1 once, depth by UCB_L/UCB_cp, heads group by group, samples grouped by depth so
    each group runs only its layers and its kept heads. The bandits are not updated."""
    model.eval()
    conf = model.config
    n_layers, n_heads = conf.num_hidden_layers, conf.num_attention_heads
    first = min(conf.fixed_layers, n_layers)
    n = len(data)
    out_labels = torch.zeros(n, dtype=torch.long)
    probs = torch.zeros(n, conf.num_labels)
    depth = torch.zeros(n, dtype=torch.long)
    heads = torch.zeros(n, n_layers, dtype=torch.long)
    reads = torch.ones(n, dtype=torch.long)  # exits read per sample (the sequential mode reads one per boundary)
    began = time.perf_counter()
    for lo in range(0, n, batch_size):
        index = torch.arange(lo, min(lo + batch_size, n))
        ids, mask, _ = data.batch(index, device)
        if policy.search == "sequential":  # T31: one walk, samples leave it where their boundary bandit stops them
            path = _SequentialPath(policy, greedy, len(index), n_layers, first, n_heads)
            walk(start(model, ids, mask), path_points(conf, max(policy.layer_options)), path)
            out_labels[index], probs[index], depth[index] = path.probs.argmax(-1), path.probs, path.depth
            heads[index], reads[index] = path.heads, path.reads
            continue
        s1 = walk(start(model, ids, mask), [first])  # S1 (= S2,0: the weights do not change)
        u = exit_uncertainty(model, s1.state, mask) if policy.exit_confidence else None
        arm, _ = policy.choose_arms(s1.state if policy.uses_s1 else None, mask, len(index), greedy=greedy,
                                    learn=False, uncertainty=u)
        layers = policy.layers_of(arm)
        for L in layers.unique().tolist():  # each depth's samples walk on from S1 together
            sel = (layers == L).nonzero().squeeze(1)
            path = _BanditPath(policy, arm[sel], greedy, n_layers, first, n_heads)
            walk(s1.select(sel.to(device)), path_points(conf, L), path)
            p = path.logits.softmax(-1)
            rows = index[sel]
            out_labels[rows] = p.argmax(-1)
            probs[rows] = p
            depth[rows] = L
            heads[rows] = path.heads
    seconds = time.perf_counter() - began
    flops, flops_lin = (torch.tensor([forward_flops(seq_len, [h for h in row.tolist() if h], conf, convention)
                                      + exit_read_flops(int(r) - 1, conf)
                                      for row, r in zip(heads, reads, strict=True)], dtype=torch.float64)
                        for convention in ("full", "linear"))
    return Predictions(out_labels, probs, depth, heads, flops, flops_lin, seconds)


class _BanditPath:
    """The decision callback (:func:`dht.walk.walk`) of samples whose depth UCB_L / UCB_cp chose from S1: at each
    group's start UCB_H and the TSB choose its heads (Algorithm 2, lines 9-14, greedy or sampled, no update), at
    the path's end the exit is read. Keeps the heads each layer ran and the logits."""

    def __init__(self, policy: Policy, arm: Tensor, greedy: bool, n_layers: int, first: int, n_heads: int):
        self.policy, self.arm, self.greedy = policy, arm, greedy
        self.heads = torch.zeros(len(arm), n_layers, dtype=torch.long)
        self.heads[:, :first] = n_heads
        self.logits = torch.empty(0)

    def __call__(self, at: At) -> Next | None:
        if at.next is None:
            self.logits = at.logits().float().cpu()
            return None
        info = self.policy.choose_heads(at.group, at.state, at.mask, self.arm, greedy=self.greedy, learn=False)
        plan = info["plan"][:, : at.next - at.depth]
        self.heads[:, at.depth : at.next] = plan.sum(dim=2)
        return Next(heads=plan)


class _SequentialPath:
    """The sequential mode's decision callback (T31): at every depth it may stop at, the exit is read and the
    boundary's bandit (greedy or sampled, no update) decides from the pooled state and the exit's statistics which
    samples stop there (they leave the walk, :func:`dht.walk.walk`); the others' next group's heads come from UCB_H
    and the TSB. At the deepest depth everyone stops. Keeps each sample's probabilities, depth, heads per layer and
    the exits it read."""

    def __init__(self, policy: Policy, greedy: bool, batch: int, n_layers: int, first: int, n_heads: int):
        self.policy, self.greedy = policy, greedy
        self.heads = torch.zeros(batch, n_layers, dtype=torch.long)
        self.heads[:, :first] = n_heads
        self.probs = torch.zeros(batch, 0)
        self.depth = torch.zeros(batch, dtype=torch.long)
        self.reads = torch.zeros(batch, dtype=torch.long)

    def __call__(self, at: At) -> Next | None:
        policy = self.policy
        logits = at.logits().float()
        if not self.probs.numel():
            self.probs = torch.zeros(len(self.depth), logits.shape[-1])
        self.reads[at.rows] += 1
        if at.next is None:
            stop = torch.ones(len(at.rows), dtype=torch.bool)
        else:
            k = policy.layer_options.index(at.depth)
            stop, _ = policy.decide_stops(k, policy.stop_context(at.state, at.mask, logits), self.greedy, learn=False)
        done = at.rows[stop]
        self.probs[done] = logits[stop.to(logits.device)].softmax(-1).cpu()
        self.depth[done] = at.depth
        if at.next is None or bool(stop.all()):
            return Next(stop=stop)
        go = at.select((~stop).nonzero().squeeze(1).to(at.state.device))
        info = policy.choose_heads(go.group, go.state, go.mask, torch.zeros(len(go.rows), dtype=torch.long),
                                   greedy=self.greedy, learn=False)
        plan = info["plan"][:, : at.next - at.depth]
        self.heads[go.rows, at.depth : at.next] = plan.sum(dim=2)
        return Next(stop=stop, heads=plan)
