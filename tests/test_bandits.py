"""Tests for dht/bandits.py: LinUCB (Algorithm 1), the TSB heads (Section 3.2) and the rewards (Section 4.3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from dht.bandits import LinUCB, LogisticThompsonHeads
from dht.rewards import RewardBaseline, ratio_reward, reward_delta, ts_reward

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _roundtrip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Serialise through torch.save like a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


# --------------------------------------------------------------------------------------------------------
# LinUCB
# --------------------------------------------------------------------------------------------------------
class LinearProblem:
    """K arms, reward = x^T theta*_k + bias*_k + N(0, noise^2)."""

    def __init__(self, n_arms: int = 5, dx: int = 8, dz: int = 2, noise: float = 0.3, seed: int = 1) -> None:
        self.g = _gen(seed)
        self.dx = dx
        self.theta = torch.randn(n_arms, dx, generator=self.g, dtype=F64)
        self.bias = 0.5 * torch.randn(n_arms, generator=self.g, dtype=F64)
        self.z = torch.randn(n_arms, dz, generator=self.g, dtype=F64)
        self.noise = noise

    def contexts(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.dx, generator=self.g, dtype=F64)

    def means(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.theta.T + self.bias

    def rewards(self, x: torch.Tensor, arms: torch.Tensor) -> torch.Tensor:
        mu = self.means(x).gather(1, arms[:, None]).squeeze(1)
        return mu + self.noise * torch.randn(len(arms), generator=self.g, dtype=F64)


def test_linucb_regret_sublinear_and_greedy_finds_best_arm() -> None:
    prob = LinearProblem()
    bandit = LinUCB(prob.z, prob.dx, alpha=1.0, lam=1.0, seed=0)
    regret = []
    for _ in range(3000):  # one sample per round, as in Algorithm 1
        x = prob.contexts(1)
        arm = bandit.select(x)
        bandit.update(x, arm, prob.rewards(x, arm))
        mu = prob.means(x)[0]
        regret.append(float(mu.max() - mu[arm]))
    regret = np.asarray(regret)
    first, last = regret[:1000].mean(), regret[2000:].mean()
    assert first > 0
    assert last < 0.2 * first, (first, last)
    assert int(bandit.counts.sum()) == 3000

    fresh = prob.contexts(4000)
    greedy = bandit.select(fresh, greedy=True)
    accuracy = (greedy == prob.means(fresh).argmax(1)).double().mean().item()
    assert accuracy > 0.9, accuracy


def _ridge(w: np.ndarray, r: np.ndarray, lam: float) -> np.ndarray:
    d = w.shape[1]
    return np.linalg.solve(w.T @ w + lam * np.eye(d), w.T @ r)


@pytest.mark.parametrize("refresh_every", [None, 7, 1024])
def test_linucb_theta_equals_closed_form_ridge(refresh_every: int | None) -> None:
    g = _gen(2)
    n_arms, dx, dz, de, lam = 4, 6, 3, 3, 0.7
    z = torch.randn(n_arms, dz, generator=g, dtype=F64)
    bandit = LinUCB(z, dx, extra_dim=de, lam=lam, refresh_every=refresh_every)
    xs, es, arms_all, rs = [], [], [], []
    # Mixed batch sizes: single samples (Sherman-Morrison), small batches (Woodbury), big ones (refresh).
    for size in [1, 1, 3, 5, 12, 40, 2, 1, 200, 9]:
        x = torch.randn(size, dx, generator=g, dtype=F64)
        e = torch.nn.functional.one_hot(torch.randint(0, de, (size,), generator=g), de).to(F64)
        arms = torch.randint(0, n_arms, (size,), generator=g)
        r = torch.randn(size, generator=g, dtype=F64)
        bandit.update(x, arms, r, extra=e)
        xs.append(x), es.append(e), arms_all.append(arms), rs.append(r)
    x, e, arms, r = (torch.cat(t) for t in (xs, es, arms_all, rs))
    theta = bandit.theta()
    for k in range(n_arms):
        sel = arms == k
        w = torch.cat([x[sel], z[k].expand(int(sel.sum()), dz), e[sel]], dim=1).numpy()
        expected = _ridge(w, r[sel].numpy(), lam)
        np.testing.assert_allclose(theta[k].numpy(), expected, rtol=0, atol=1e-8)
        a = w.T @ w + lam * np.eye(w.shape[1])
        np.testing.assert_allclose(bandit.A[k].numpy(), a, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bandit.A_inv[k].numpy(), np.linalg.inv(a), rtol=0, atol=1e-10)
    assert bandit.counts.tolist() == [int((arms == k).sum()) for k in range(n_arms)]


def test_linucb_batched_selection_equals_per_sample() -> None:
    g = _gen(3)
    n_arms, dx, dz, de = 5, 7, 4, 3
    bandit = LinUCB(torch.randn(n_arms, dz, generator=g), dx, extra_dim=de, alpha=0.8)
    x = torch.randn(300, dx, generator=g)
    e = torch.nn.functional.one_hot(torch.randint(0, de, (300,), generator=g), de).float()
    bandit.update(x, torch.randint(0, n_arms, (300,), generator=g), torch.randn(300, generator=g), extra=e)

    xq = torch.randn(64, dx, generator=g)
    eq = torch.nn.functional.one_hot(torch.randint(0, de, (64,), generator=g), de).float()
    for greedy in (False, True):
        batched_scores = bandit.scores(xq, eq, greedy=greedy)
        batched = bandit.select(xq, eq, greedy=greedy)
        for i in range(64):
            single_scores = bandit.scores(xq[i : i + 1], eq[i : i + 1], greedy=greedy)
            torch.testing.assert_close(batched_scores[i : i + 1], single_scores, rtol=1e-12, atol=1e-12)
            assert int(bandit.select(xq[i : i + 1], eq[i : i + 1], greedy=greedy)) == int(batched[i])
        # and the scores are the formula of Algorithm 1 line 6
        w = bandit.aggregate(xq, eq)[5]  # [K, d]
        mean = (w * bandit.theta()).sum(-1)
        bonus = torch.stack([w[k] @ torch.linalg.inv(bandit.A[k]) @ w[k] for k in range(n_arms)]).sqrt()
        expected = mean if greedy else mean + 0.8 * bonus
        torch.testing.assert_close(batched_scores[5], expected, rtol=1e-10, atol=1e-10)


def test_linucb_no_drift_after_a_million_updates() -> None:
    g = _gen(4)
    n_arms, dx, dz = 5, 14, 2
    d = dx + dz
    bandit = LinUCB(torch.randn(n_arms, dz, generator=g, dtype=F64), dx)  # default refresh_every
    small = n_arms * (d // 4)  # d/4 samples per arm and call: the incremental Woodbury path
    small_arms = torch.arange(small) % n_arms
    for _ in range(10):
        # one huge batch (exact Cholesky path) ...
        x = torch.randn(98_000, dx, generator=g, dtype=F64)
        bandit.update(x, torch.randint(0, n_arms, (98_000,), generator=g), torch.randn(98_000, generator=g))
        # ... then 100 small ones (Woodbury + periodic refresh): 10 * (98_000 + 100 * 20) = 10^6 updates
        for _ in range(100):
            x = torch.randn(small, dx, generator=g, dtype=F64)
            bandit.update(x, small_arms, torch.randn(small, generator=g, dtype=F64))
    assert int(bandit.counts.sum()) == 1_000_000
    assert torch.isfinite(bandit.A_inv).all() and torch.isfinite(bandit.theta()).all()
    exact = torch.linalg.inv(bandit.A)
    rel = (torch.linalg.matrix_norm(bandit.A_inv - exact) / torch.linalg.matrix_norm(exact)).max()
    assert rel < 1e-9, float(rel)


def test_linucb_woodbury_alone_does_not_drift() -> None:
    """Even with the Cholesky refresh switched off, the incremental inverse stays accurate."""
    g = _gen(5)
    bandit = LinUCB(torch.zeros(3, 0), 16, refresh_every=None)
    arms = torch.arange(12) % 3  # 4 = d/4 samples per arm and call
    for _ in range(3000):
        bandit.update(torch.randn(12, 16, generator=g), arms, torch.randn(12, generator=g))
    assert int(bandit._since_refresh.min()) == 12_000  # really never refreshed
    exact = torch.linalg.inv(bandit.A)
    rel = (torch.linalg.matrix_norm(bandit.A_inv - exact) / torch.linalg.matrix_norm(exact)).max()
    assert rel < 1e-10, float(rel)


def _run(bandit: LinUCB, seed: int, rounds: int = 200, greedy: bool = False) -> list[int]:
    prob = LinearProblem(seed=seed)
    choices = []
    for _ in range(rounds):
        x = prob.contexts(4)
        arms = bandit.select(x, greedy=greedy)
        bandit.update(x, arms, prob.rewards(x, arms))
        choices += arms.tolist()
    return choices


def test_linucb_same_seed_same_choices_and_ties_use_the_generator() -> None:
    z = LinearProblem().z
    assert _run(LinUCB(z, 8, seed=11), 0) == _run(LinUCB(z, 8, seed=11), 0)
    # At the prior every greedy score is 0: the tie-break is random, seeded, and uses all arms.
    x = torch.randn(500, 8)
    a, b, c = (LinUCB(z, 8, seed=s).select(x, greedy=True) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == set(range(5))


def test_linucb_state_dict_roundtrip_gives_identical_choices() -> None:
    z = LinearProblem().z
    original = LinUCB(z, 8, alpha=0.5, seed=3, refresh_every=50)
    _run(original, seed=0, rounds=100)
    restored = LinUCB(z, 8, alpha=2.0, seed=99, refresh_every=7)  # different settings, all overwritten
    restored.load_state_dict(_roundtrip(original.state_dict()))
    assert restored.alpha == 0.5 and restored.refresh_every == 50
    # greedy=True on half the rounds also exercises the tie-breaking RNG
    assert _run(original, seed=5, rounds=150) == _run(restored, seed=5, rounds=150)
    for key, value in original.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    with pytest.raises(ValueError, match="K="):
        LinUCB(torch.zeros(4, 2), 8).load_state_dict(original.state_dict())


def test_linucb_state_dict_is_safetensors_compatible(tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    bandit = LinUCB(torch.randn(3, 2), 4, refresh_every=None)
    _ = bandit.select(torch.randn(2, 4))
    path = tmp_path / "ucb.safetensors"
    safetensors_torch.save_file(bandit.state_dict(), str(path))
    other = LinUCB(torch.randn(3, 2), 4)
    other.load_state_dict(safetensors_torch.load_file(str(path)))
    assert other.refresh_every is None
    x = torch.randn(50, 4)
    assert torch.equal(bandit.select(x, greedy=True), other.select(x, greedy=True))


def test_linucb_allowed_mask() -> None:
    g = _gen(6)
    bandit = LinUCB(torch.randn(4, 2, generator=g), 3)
    x = torch.randn(100, 3, generator=g)
    only_23 = torch.tensor([False, False, True, True])
    assert set(bandit.select(x, allowed=only_23).tolist()) <= {2, 3}
    per_sample = torch.zeros(100, 4, dtype=torch.bool)
    per_sample[torch.arange(100), torch.arange(100) % 4] = True
    assert torch.equal(bandit.select(x, allowed=per_sample), torch.arange(100) % 4)
    with pytest.raises(ValueError, match="at least one allowed arm"):
        bandit.select(x, allowed=torch.zeros(4, dtype=torch.bool))


def test_linucb_input_validation() -> None:
    bandit = LinUCB(torch.zeros(3, 2), 4, extra_dim=2)
    with pytest.raises(ValueError, match="contexts"):
        bandit.select(torch.zeros(5, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="needs extra"):
        bandit.select(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="out of range"):
        bandit.update(torch.zeros(2, 4), torch.tensor([0, 3]), torch.zeros(2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="finite"):
        bandit.update(torch.zeros(1, 4), torch.tensor([0]), torch.tensor([float("nan")]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="lam"):
        LinUCB(torch.zeros(3, 2), 4, lam=0.0)


def test_linucb_paper_sizes() -> None:
    """Section 7.3: UCB_L vector 84 + 84 = 168, UCB_H vector 42 + 42 + 3 = 87."""
    assert LinUCB(torch.zeros(4, 84), 84).dim == 168
    ucb_h = LinUCB(torch.zeros(3, 42), 42, extra_dim=3)
    assert ucb_h.dim == 87
    e = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    assert ucb_h.select(torch.randn(2, 42), e).shape == (2,)


# --------------------------------------------------------------------------------------------------------
# LogisticThompsonHeads
# --------------------------------------------------------------------------------------------------------
class LogisticHeads:
    """12 heads with hidden weights: P(head h succeeds | x) = sigmoid(x^T W_h + c_h)."""

    def __init__(self, n_heads: int = 12, dx: int = 12, seed: int = 3) -> None:
        self.g = _gen(seed)
        self.dx = dx
        self.w = 0.5 * torch.randn(n_heads, dx, generator=self.g, dtype=F64)
        self.c = torch.linspace(-2, 2, n_heads, dtype=F64)[torch.randperm(n_heads, generator=self.g)]

    def contexts(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.dx, generator=self.g, dtype=F64)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x @ self.w.T + self.c)

    def feedback(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(self.probs(x), generator=self.g)


def test_tsb_finds_best_heads() -> None:
    prob = LogisticHeads()
    ts = LogisticThompsonHeads(12, prob.dx, seed=0)
    k = 4
    for _ in range(750):  # 3000 decisions in batches of 4
        x = prob.contexts(4)
        chosen = ts.select(x, k)
        assert (chosen.sum(1) == k).all()
        ts.update(x, chosen, prob.feedback(x))  # each chosen head observes its own 0/1 outcome
    fresh = prob.contexts(4000)
    greedy = ts.select(fresh, k, greedy=True)
    best = torch.zeros_like(greedy).scatter(1, prob.probs(fresh).topk(k, dim=1).indices, True)
    overlap = (greedy & best).sum(1).double().mean().item()
    assert overlap >= 3.5, overlap
    assert torch.isfinite(ts.m).all()


def test_tsb_precision_grows_only_for_chosen_heads() -> None:
    g = _gen(7)
    ts = LogisticThompsonHeads(12, 12, seed=1)
    for _ in range(20):
        x = torch.randn(8, 12, generator=g)
        chosen = ts.select(x, 3)
        chosen[:, 0] = False  # head 0 is never chosen
        q_before, m_before = ts.q.clone(), ts.m.clone()
        ts.update(x, chosen, torch.randint(0, 2, (8,), generator=g).float())
        hit = chosen.any(0)
        assert (ts.q[hit] > q_before[hit]).all()  # the bias feature makes every coordinate's x^2 > 0
        assert torch.equal(ts.q[~hit], q_before[~hit]) and torch.equal(ts.m[~hit], m_before[~hit])
    assert torch.equal(ts.q[0], torch.ones(13, dtype=F64)) and int(ts.counts[0]) == 0


def test_tsb_map_step_is_the_exact_minimiser() -> None:
    """After an update, m is the argmin of Chapelle & Li's objective (its gradient vanishes)."""
    g = _gen(8)
    ts = LogisticThompsonHeads(3, 4, lam=2.0)
    m0, q0 = ts.m.clone(), ts.q.clone()
    x = torch.randn(40, 4, generator=g, dtype=F64)
    chosen = torch.rand(40, 3, generator=g) < 0.6
    y = torch.randint(0, 2, (40, 3), generator=g).to(F64)
    ts.update(x, chosen, y)
    v = torch.cat([x, torch.ones(40, 1, dtype=F64)], 1)
    for h in range(3):
        vh, yh = v[chosen[:, h]], 2 * y[chosen[:, h], h] - 1
        w = ts.m[h]
        grad = q0[h] * (w - m0[h]) - (yh[:, None] * vh * torch.sigmoid(-yh * (vh @ w))[:, None]).sum(0)
        assert grad.abs().max() < 1e-8
        p = torch.sigmoid(vh @ w)
        torch.testing.assert_close(ts.q[h], q0[h] + (vh**2 * (p * (1 - p))[:, None]).sum(0))


def test_tsb_no_nan_on_separable_extreme_data() -> None:
    g = _gen(9)
    ts = LogisticThompsonHeads(12, 12, seed=2)
    for step in range(300):
        x = 50.0 * torch.randn(256, 12, generator=g)  # huge logits, perfectly separable labels
        chosen = ts.select(x, 6)
        ts.update(x, chosen, (x[:, 0] > 0).float() if step % 2 else torch.ones(256))
    assert torch.isfinite(ts.m).all() and torch.isfinite(ts.q).all() and (ts.q > 0).all()
    assert torch.isfinite(ts.scores(torch.randn(10, 12))).all()


def test_tsb_select_k_per_sample_allowed_and_ties() -> None:
    ts = LogisticThompsonHeads(12, 5, seed=4)
    x = torch.randn(6, 5)
    k = torch.tensor([0, 1, 8, 10, 12, 4])
    chosen = ts.select(x, k)
    assert chosen.dtype == torch.bool and chosen.shape == (6, 12)
    assert chosen.sum(1).tolist() == k.tolist()
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[[1, 3, 5, 7, 9]] = True
    assert not ts.select(x, 4, allowed=allowed)[:, ~allowed].any()
    with pytest.raises(ValueError, match="fewer allowed heads"):
        ts.select(x, 6, allowed=allowed)
    with pytest.raises(ValueError, match="k must"):
        ts.select(x, 13)
    # greedy at the prior: all heads tie at 0.5; the tie-break is seeded and not always heads 0..k-1
    a = LogisticThompsonHeads(12, 5, seed=1).select(torch.randn(50, 5), 4, greedy=True)
    b = LogisticThompsonHeads(12, 5, seed=1).select(torch.randn(50, 5), 4, greedy=True)
    assert torch.equal(a, b) and a.any(0).all()


def test_tsb_shared_reward_equals_broadcast_per_head_reward() -> None:
    g = _gen(10)
    x = torch.randn(16, 6, generator=g)
    chosen = torch.rand(16, 12, generator=g) < 0.5
    r = torch.randint(0, 2, (16,), generator=g).float()
    a, b = LogisticThompsonHeads(12, 6), LogisticThompsonHeads(12, 6)
    a.update(x, chosen, r)
    b.update(x, chosen, r[:, None].expand(16, 12))
    assert torch.equal(a.m, b.m) and torch.equal(a.q, b.q)
    with pytest.raises(ValueError, match="0 or 1"):
        a.update(x, chosen, torch.full((16,), 0.5))


def test_tsb_arm_feature_option() -> None:
    z = torch.randn(12, 12)
    ts = LogisticThompsonHeads(12, 12, use_arm_features=True, arm_features=z)
    assert ts.dim == 24
    assert LogisticThompsonHeads(12, 12).dim == 13  # Section 7.3's TSB vector size
    x = torch.randn(5, 12)
    v = ts.features(x)
    torch.testing.assert_close(v[2, 7], torch.cat([x[2], z[7]]).double())
    chosen = ts.select(x, 4)
    ts.update(x, chosen, torch.ones(5))
    assert torch.isfinite(ts.m).all()
    with pytest.raises(ValueError, match="arm_features"):
        LogisticThompsonHeads(12, 12, use_arm_features=True)


def test_tsb_state_dict_roundtrip_gives_identical_choices() -> None:
    prob = LogisticHeads(seed=11)

    def run(ts: LogisticThompsonHeads, rounds: int, seed: int) -> list[list[bool]]:
        g = _gen(seed)
        out = []
        for _ in range(rounds):
            x = torch.randn(4, 12, generator=g, dtype=F64)
            chosen = ts.select(x, 4)
            ts.update(x, chosen, torch.bernoulli(prob.probs(x), generator=g))
            out += chosen.tolist()
        return out

    original = LogisticThompsonHeads(12, 12, alpha=0.7, seed=5)
    run(original, 30, seed=0)
    restored = LogisticThompsonHeads(12, 12, seed=123)
    restored.load_state_dict(_roundtrip(original.state_dict()))
    assert run(original, 40, seed=1) == run(restored, 40, seed=1)
    assert run(LogisticThompsonHeads(12, 12, seed=5), 10, 0) == run(
        LogisticThompsonHeads(12, 12, seed=5), 10, 0
    )


# --------------------------------------------------------------------------------------------------------
# Rewards (Section 4.3)
# --------------------------------------------------------------------------------------------------------
def test_ratio_reward_formula_and_first_batch_rule() -> None:
    delta = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(ratio_reward(delta, 2.0, 0.5), torch.tensor([1.0, 0.5, 0.25]))
    first = ratio_reward(delta, None, 0.5)  # no previous batch: neutral ratio 1 -> reward = scale
    torch.testing.assert_close(first, torch.full((3,), 0.5))
    assert ratio_reward(delta.double(), 1.0, 1.0).dtype == F64


def test_ratio_reward_eps_protection_and_clip() -> None:
    r = ratio_reward(torch.tensor([0.0, 1.0]), 2.0, 1.0, eps=1e-6)
    assert torch.isfinite(r).all() and r[0] == pytest.approx(2e6)
    torch.testing.assert_close(ratio_reward(torch.tensor([0.0]), 0.0, 3.0), torch.tensor([3.0]))  # 0/0 -> 1
    torch.testing.assert_close(
        ratio_reward(torch.tensor([0.0, 1.0]), 2.0, 1.0, clip=10.0), torch.tensor([10.0, 2.0])
    )
    with pytest.raises(ValueError, match="non-negative"):
        ratio_reward(torch.tensor([-1.0]), 1.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        ratio_reward(torch.tensor([float("nan")]), 1.0, 1.0)


def test_ts_reward_sign_convention() -> None:
    r = torch.tensor([0.5, 1.0, 1.5])
    assert ts_reward(r).tolist() == [0.0, 0.0, 1.0]  # text's intent: 1 = better than the previous batch
    assert ts_reward(r, printed_cases=True).tolist() == [1.0, 1.0, 0.0]  # Section 4.3 as printed
    assert ts_reward(r, threshold=0.6).tolist() == [0.0, 1.0, 1.0]


def test_reward_delta() -> None:
    loss = torch.tensor([0.5, 1.0])
    torch.testing.assert_close(reward_delta(loss, torch.tensor([3, 6])), torch.tensor([1.5, 6.0]))
    torch.testing.assert_close(reward_delta(loss, 12, torch.tensor([8, 10])), torch.tensor([48.0, 120.0]))
    # gamma weighs the cost: 0 leaves the loss alone, 0.5 the square roots of L and H.
    torch.testing.assert_close(reward_delta(loss, torch.tensor([3, 6]), cost_exponent=0.0), loss)
    torch.testing.assert_close(reward_delta(loss, torch.tensor([4, 9]), torch.tensor([4, 4]), cost_exponent=0.5),
                               loss * torch.tensor([4.0, 6.0]))


def test_reward_baseline_keys_and_state() -> None:
    base = RewardBaseline()
    r1 = base.reward("ucb_l/L3", torch.tensor([1.0, 3.0]), scale=2.0)
    torch.testing.assert_close(r1, torch.tensor([2.0, 2.0]))  # first batch of this key: neutral
    assert base.get("ucb_l/L3") == pytest.approx(2.0)
    r2 = base.reward("ucb_l/L3", torch.tensor([1.0, 4.0]), scale=2.0)  # previous mean 2.0
    torch.testing.assert_close(r2, torch.tensor([4.0, 1.0]))
    assert base.get("ucb_l/L6") is None  # keys are independent (a new L-queue starts fresh)
    torch.testing.assert_close(base.reward("ucb_l/L6", torch.tensor([7.0]), 1.0), torch.tensor([1.0]))

    restored = RewardBaseline()
    restored.load_state_dict(_roundtrip(base.state_dict()))
    assert restored.keys() == base.keys() and restored.get("ucb_l/L3") == base.get("ucb_l/L3")
    restored.reset("ucb_l/L3")
    assert restored.get("ucb_l/L3") is None and restored.get("ucb_l/L6") == 7.0
    restored.reset()
    assert restored.keys() == []
