"""dht.walk: the forward pass walked from stopping point to stopping point, a decision callback at each.

A mode that decides stop or continue at every group boundary (the next issue's `sequential` DHT mode) plugs in as
such a callback; here one stops each sample at a depth of its own and gives the others a head plan of their own,
and every sample must come out as the model's own per-sample forward (``depth``, ``heads``) computes it."""

from __future__ import annotations

import pytest
import torch

from dht.model import DHTConfig, DHTForSequenceClassification
from dht.walk import At, Next, path_points, start, walk

SEQ, N = 10, 12


@pytest.mark.parametrize("layer_norm", ["post", "pre"])
def test_samples_stopped_at_the_boundaries_of_one_walk_read_as_their_own_forward(layer_norm):
    torch.manual_seed(0)
    conf = DHTConfig(vocab_size=40, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=SEQ, num_labels=3, fixed_layers=2, group_size=2, layer_norm=layer_norm,
                     classifier_pooling="mean")
    model = DHTForSequenceClassification(conf).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, SEQ, (N,), generator=g)
    lengths[0] = SEQ  # the longest sample stops first: the batch is then cut to the others' length
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = torch.randint(4, 40, (N, SEQ), generator=g) * mask
    depth = torch.tensor([2, 6, 4, 2, 6, 4, 6, 2, 4, 6, 6, 4])  # each sample's own stopping point (sample 0: the first)
    heads = torch.rand(N, 6, 4, generator=g) < 0.6
    heads[:, :, 0] = True  # every layer keeps a head
    heads[:, :2] = True  # the b fixed layers keep every head

    logits = torch.zeros(N, 3)
    widths = []

    def decide(at: At) -> Next:
        widths.append((at.depth, at.state.shape[1], int(at.mask.sum(dim=1).max())))
        stop = depth[at.rows] == at.depth
        if bool(stop.any()):
            logits[at.rows[stop]] = at.logits()[stop]
        go_on = at.rows[~stop]
        return Next(stop=stop, heads=None if at.next is None else heads[go_on, at.depth : at.next])

    with torch.no_grad():
        end = walk(start(model, ids, mask), path_points(conf, 6), decide)
        expected = model(ids, mask, depth=depth, heads=heads).logits
    assert len(end.rows) == 0  # every sample stopped
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    # after the first stop the batch holds only the others' columns
    assert widths[0] == (2, SEQ, SEQ) and all(width == longest for _, width, longest in widths[1:])
    assert widths[1][1] < SEQ


def test_a_path_stops_after_the_fixed_layers_and_each_group_it_enters():
    conf = DHTConfig(vocab_size=40, hidden_size=32, num_hidden_layers=7, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=SEQ, num_labels=3, fixed_layers=2, group_size=2)
    assert path_points(conf, 7) == [2, 4, 6, 7]  # the last group is one layer (7 - 2 is not a multiple of 2)
    assert path_points(conf, 4) == [2, 4]
    assert path_points(conf, 2) == [2]
    assert path_points(conf, 1) == [1]  # shorter than b: the path is its fixed layers
