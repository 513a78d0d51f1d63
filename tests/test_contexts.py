"""Tests for dht/contexts.py: multi-granularity pooling (Section 7.1), running normalisation (Section 7.2),
arm-feature accumulation and head slices (Section 4.2)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import ROOT

from dht.config import PoolingConfig
from dht.config_loading import load_config
from dht.contexts import (
    ArmFeatureAccumulator,
    RunningNormalizer,
    head_slices,
    multi_granularity_pool,
    pool_head_slices,
)

FEATURES = load_config(ROOT / "params.yaml").dht.features  # the paper's poolings, params.yaml's
UCB_L = FEATURES.ucb_l


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pooling(seq_splits, hidden_splits) -> PoolingConfig:
    return PoolingConfig(seq_splits=list(seq_splits), hidden_splits=list(hidden_splits))


def _naive_pool(states: torch.Tensor, mask: torch.Tensor | None, seq_splits, hidden_splits) -> torch.Tensor:
    """Loop-by-loop reference: valid tokens, k equal parts by rank, then m equal hidden chunks."""
    out = []
    for i in range(states.shape[0]):
        tokens = states[i] if mask is None else states[i][mask[i].bool()]
        n = tokens.shape[0]
        parts = []
        for k in seq_splits:
            for j in range(k):
                members = [p for p in range(n) if p * k // n == j]
                parts.append(tokens[members].mean(0) if members else torch.zeros(states.shape[2]))
        feats = []
        for vec in parts:
            for m in hidden_splits:
                feats += [chunk.mean() for chunk in vec.chunk(m)]
        out.append(torch.stack(feats))
    return torch.stack(out)


def test_pool_hand_computed_example() -> None:
    # S = 4, D = 8, token r = [8r, ..., 8r + 7]
    states = torch.arange(32, dtype=torch.float64).reshape(1, 4, 8)
    out = multi_granularity_pool(states, None, _pooling((1, 2), (2, 4)))
    expected = [
        # whole sequence: mean token = [12..19]; halves -> 13.5, 17.5; quarters -> 12.5, 14.5, 16.5, 18.5
        13.5, 17.5, 12.5, 14.5, 16.5, 18.5,
        # first half of the sequence (tokens 0, 1): [4..11]
        5.5, 9.5, 4.5, 6.5, 8.5, 10.5,
        # second half (tokens 2, 3): [20..27]
        21.5, 25.5, 20.5, 22.5, 24.5, 26.5,
    ]  # fmt: skip
    assert out.shape == (1, 18)
    torch.testing.assert_close(out[0], torch.tensor(expected, dtype=torch.float64))


def test_pool_hand_computed_with_padding() -> None:
    # 3 valid tokens of 4: parts of k=2 are floor(p * 2 / 3) -> tokens {0, 1} and {2}
    states = torch.arange(32, dtype=torch.float64).reshape(1, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = multi_granularity_pool(states, mask, _pooling((1, 2), (1,)))
    torch.testing.assert_close(out[0], torch.tensor([11.5, 7.5, 19.5], dtype=torch.float64))


def test_padding_does_not_change_the_result() -> None:
    g = _gen(0)
    lengths = [5, 11, 1, 16, 7]
    batch = torch.randn(len(lengths), 16, 32, generator=g)
    mask = torch.zeros(len(lengths), 16, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    pooled = multi_granularity_pool(batch, mask, UCB_L)
    for i, n in enumerate(lengths):
        alone = multi_granularity_pool(batch[i : i + 1, :n], None, UCB_L)
        torch.testing.assert_close(pooled[i : i + 1], alone)
    # garbage in the padding is ignored
    noisy = batch.masked_fill(mask[..., None] == 0, 1e6)
    torch.testing.assert_close(multi_granularity_pool(noisy, mask, UCB_L), pooled)
    # left padding gives the same result as right padding (parts are by rank among the real tokens)
    left = torch.stack([torch.roll(batch[i], 16 - n, dims=0) for i, n in enumerate(lengths)])
    left_mask = torch.stack([torch.roll(mask[i], 16 - n) for i, n in enumerate(lengths)])
    torch.testing.assert_close(multi_granularity_pool(left, left_mask, UCB_L), pooled)


def test_pool_matches_naive_reference() -> None:
    g = _gen(1)
    states = torch.randn(6, 13, 24, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 13, generator=g) < 0.7).long()
    mask[:, 0] = 1
    mask[5] = 0
    mask[5, 3] = 1  # one valid token: parts of k = 2, 4 are partly empty -> zeros
    seq, hid = (1, 2, 4), (2, 3, 6)
    pooling = _pooling(seq, hid)
    torch.testing.assert_close(
        multi_granularity_pool(states, mask, pooling), _naive_pool(states, mask, seq, hid)
    )
    torch.testing.assert_close(
        multi_granularity_pool(states, None, pooling), _naive_pool(states, None, seq, hid)
    )
    # all-padding sample: zeros, not NaN
    empty = multi_granularity_pool(states[:1], torch.zeros(1, 13), pooling)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_output_sizes_match_the_paper() -> None:
    states = torch.randn(2, 10, 768)
    assert FEATURES.ucb_l.size == FEATURES.ucb_cp.size == 84
    assert FEATURES.ucb_h.size == 42
    assert FEATURES.tsb.size == 12
    for name, size in [("ucb_l", 84), ("ucb_cp", 84), ("ucb_h", 42), ("tsb", 12)]:
        assert multi_granularity_pool(states, None, getattr(FEATURES, name)).shape == (2, size)
    assert _pooling((1, 2), (2, 4, 8)).size == 42
    assert multi_granularity_pool(states, torch.ones(2, 10), _pooling((1,), (4, 8))).shape == (2, 12)


def test_invalid_splits_raise() -> None:
    with pytest.raises(ValueError, match=r"hidden size 776 is not divisible by hidden split 16"):
        multi_granularity_pool(torch.zeros(1, 4, 776), None, UCB_L)  # 776 = 8 * 97
    # the splits themselves are checked where they are written (PoolingConfig, a pydantic model: a ValueError)
    with pytest.raises(ValueError, match="seq_splits"):
        multi_granularity_pool(torch.zeros(1, 4, 8), None, _pooling((), UCB_L.hidden_splits))
    with pytest.raises(ValueError, match="hidden_splits"):
        multi_granularity_pool(torch.zeros(1, 4, 8), None, _pooling(UCB_L.seq_splits, (0, 4)))
    with pytest.raises(ValueError, match="attention_mask"):
        multi_granularity_pool(torch.zeros(2, 4, 16), torch.ones(2, 5), UCB_L)
    with pytest.raises(ValueError, match=r"\[B, S, D\]"):
        multi_granularity_pool(torch.zeros(4, 8), None, UCB_L)


def test_pooling_is_linear_so_mean_of_pooled_equals_pooled_mean() -> None:
    states = torch.randn(20, 8, 64, generator=_gen(2), dtype=torch.float64)
    acc = ArmFeatureAccumulator()
    acc.add("arm", multi_granularity_pool(states[:7], None, UCB_L))
    acc.add("arm", multi_granularity_pool(states[7:], None, UCB_L))
    torch.testing.assert_close(acc.mean("arm"), multi_granularity_pool(states.mean(0, keepdim=True), None, UCB_L)[0])


def test_head_slices_and_their_pooling() -> None:
    states = torch.randn(3, 5, 768, generator=_gen(3))
    sl = head_slices(states, 12)
    assert sl.shape == (3, 5, 12, 64)
    torch.testing.assert_close(sl[:, :, 7], states[..., 7 * 64 : 8 * 64])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]])
    pooled = pool_head_slices(states, mask, 12, FEATURES.tsb)
    assert pooled.shape == (3, 12, 12)
    for h in (0, 5, 11):
        torch.testing.assert_close(
            pooled[:, h], multi_granularity_pool(states[..., h * 64 : (h + 1) * 64], mask, FEATURES.tsb)
        )
    # 4-dim slices (hidden 48, 12 heads) keep the hidden splits that divide them: (4, 8) -> (4)
    narrow = torch.randn(3, 5, 48, generator=_gen(4))
    pooled = pool_head_slices(narrow, mask, 12, FEATURES.tsb)
    assert pooled.shape == (3, 12, 4)
    torch.testing.assert_close(pooled[:, 7], multi_granularity_pool(narrow[..., 28:32], mask, _pooling((1,), (4,))))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        head_slices(torch.zeros(1, 2, 10), 4)


# --------------------------------------------------------------------------------------------------------
# RunningNormalizer
# --------------------------------------------------------------------------------------------------------
def test_running_normalizer_matches_numpy_over_all_batches() -> None:
    g = _gen(4)
    batches = [3.0 + 2.0 * torch.randn(n, 6, generator=g) for n in (1, 7, 50, 2, 300)]
    norm = RunningNormalizer(6)
    for b in batches:
        norm.update(b)
    data = torch.cat(batches).double().numpy()
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm.std.numpy(), data.std(0), rtol=1e-10)
    assert float(norm.count) == 360
    x = torch.randn(4, 6, generator=g)
    expected = (x.double().numpy() - data.mean(0)) / np.sqrt(data.var(0) + norm.eps)
    out = norm.normalize(x)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_running_normalizer_edge_cases_and_clip() -> None:
    x = torch.tensor([[1.0, -2.0], [3.0, 5.0]])
    norm = RunningNormalizer(2, clip=0.5)
    assert torch.equal(norm.normalize(x), x)  # before any data: identity
    norm.update(x[:1])
    torch.testing.assert_close(norm.normalize(x), (x - x[0]).clamp(-0.5, 0.5))  # one sample: centre only
    out = norm(torch.randn(100, 2) * 10)  # update + normalise
    assert out.abs().max() <= 0.5
    with pytest.raises(ValueError, match="last dimension"):
        norm.update(torch.zeros(3, 4))


def test_running_normalizer_state_roundtrip() -> None:
    g = _gen(5)
    a = RunningNormalizer(3)
    a.update(torch.randn(40, 3, generator=g))
    b = RunningNormalizer(3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    more = torch.randn(25, 3, generator=g)
    a.update(more)
    b.update(more)
    for key in ("count", "mean", "m2"):
        assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    x = torch.randn(5, 3, generator=g)
    assert torch.equal(a.normalize(x), b.normalize(x))
    with pytest.raises(ValueError, match="feature size"):
        RunningNormalizer(4).load_state_dict(a.state_dict())


# --------------------------------------------------------------------------------------------------------
# ArmFeatureAccumulator
# --------------------------------------------------------------------------------------------------------
def test_accumulator_mean_and_bounded_state() -> None:
    g = _gen(6)
    acc = ArmFeatureAccumulator()
    seen: dict[str, list[torch.Tensor]] = {"L3": [], "L6": []}
    sizes = []
    for step in range(200):
        key = "L3" if step % 3 else "L6"
        batch = torch.randn(int(torch.randint(1, 9, (1,), generator=g)), 84, generator=g)
        acc.add(key, batch)
        seen[key].append(batch)
        if step in (10, 199):
            sizes.append(sum(t.numel() for t in acc.state_dict().values()))
    assert sizes[0] == sizes[1] == 2 * (84 + 1)  # fixed-size state: a sum and a count per arm
    for key, batches in seen.items():
        torch.testing.assert_close(acc.mean(key), torch.cat(batches).double().mean(0))
        assert acc.count(key) == sum(len(b) for b in batches)
    assert acc.keys() == ["L6", "L3"]  # insertion order
    assert acc.stack(["L3", "L6"]).shape == (2, 84)
    acc.add("single", torch.ones(84))  # one vector
    assert acc.count("single") == 1
    with pytest.raises(KeyError):
        acc.mean("L9")
    with pytest.raises(ValueError, match="feature size"):
        acc.add("L3", torch.zeros(2, 42))


def test_accumulator_state_roundtrip(tmp_path) -> None:
    acc = ArmFeatureAccumulator()
    acc.add("ucb_cp.6L8H", torch.randn(5, 84))  # keys may contain dots
    acc.add("tsb.head3", torch.randn(7, 12))
    other = ArmFeatureAccumulator()
    other.load_state_dict(acc.state_dict())
    assert other.keys() == acc.keys()
    assert "tsb.head3" in other and len(other) == 2
    for key in acc:
        assert torch.equal(other.mean(key), acc.mean(key))
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "arms.safetensors"
    safetensors_torch.save_file(acc.state_dict(), str(path))
    third = ArmFeatureAccumulator()
    third.load_state_dict(safetensors_torch.load_file(str(path)))
    assert torch.equal(third.mean("tsb.head3"), acc.mean("tsb.head3"))
    with pytest.raises(ValueError, match="unexpected entry"):
        third.load_state_dict({"bogus.x": torch.zeros(1)})
