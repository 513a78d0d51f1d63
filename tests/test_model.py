"""Tests for dht.model: BERT parity, the per-sample execution plan, sliced vs masked heads, save/load."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from dht.model import (
    DHTAttention,
    DHTConfig,
    DHTForSequenceClassification,
    head_mask_from_choices,
    head_mask_from_groups,
)

# Small BERT: 6 layers, 6 heads of 8. initializer_range is large on purpose so that pruning a head or a layer
# changes the logits by much more than the tolerances (with BERT's 0.02 the differences would be ~1e-3).
ARCH = dict(
    vocab_size=64,
    hidden_size=48,
    num_hidden_layers=6,
    num_attention_heads=6,
    intermediate_size=96,
    max_position_embeddings=32,
    type_vocab_size=2,
    initializer_range=0.2,
    num_labels=3,
)
ATOL = 1e-5


def make_bert(**overrides) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**{**ARCH, **overrides})).eval()


def make_dht(attn_implementation: str = "sdpa", **overrides) -> DHTForSequenceClassification:
    torch.manual_seed(0)
    config = DHTConfig(
        **{**ARCH, **overrides}, fixed_layers=2, group_size=2, attn_implementation=attn_implementation
    )
    return DHTForSequenceClassification(config).eval()


def make_batch(batch: int = 8, seq_len: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, ARCH["vocab_size"], (batch, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.randint(3, seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len
    for i, n in enumerate(lengths.tolist()):
        attention_mask[i, n:] = 0
        input_ids[i, n:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, seq_len // 2 :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def mixed_plan(batch: int = 8, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample depths (including 0 and the maximum) and random head sets, some layers with zero heads."""
    g = torch.Generator().manual_seed(seed)
    n_layers, n_heads = ARCH["num_hidden_layers"], ARCH["num_attention_heads"]
    depth = torch.tensor([6, 2, 4, 6, 0, 3, 5, 1])[:batch]
    heads = torch.rand(batch, n_layers, n_heads, generator=g) > 0.45
    heads[1, 1] = False  # a sample with zero heads in a layer it runs
    heads[3, 4] = False
    heads[5] = True  # a sample with all heads: shares a group with others in some layers
    heads[6, :, :2] = True
    heads[6, :, 2:] = False
    heads[7, 3:] = False  # rows past the depth are ignored
    # Samples 0 and 2 keep three heads each in layers 2-3, but different ones: the batched-gather branch.
    heads[0, 2:4] = torch.tensor([True, True, True, False, False, False])
    heads[2, 2:4] = torch.tensor([False, False, True, True, False, True])
    return depth, heads


@pytest.fixture(scope="module")
def bert() -> BertForSequenceClassification:
    return make_bert()


# ---- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(hidden_size=50, num_attention_heads=12), "divisible"),
        (dict(fixed_layers=13), "fixed_layers"),
        (dict(fixed_layers=-1), "fixed_layers"),
        (dict(group_size=0), "group_size"),
        (dict(attn_implementation="flash"), "attn_implementation"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(hidden_act="no-such-act"), "hidden_act"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(layer_norm="sandwich"), "layer_norm"),
        (dict(residual_init_scale=1.5), "residual_init_scale"),
        (dict(residual_init_scale=0.0), "layer_norm='pre'"),  # post-LN with zeroed branches never trains
    ],
)
def test_config_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DHTConfig(**kwargs)


def test_the_pipeline_builds_a_model_from_the_profile_never_from_dhtconfigs_defaults():
    """DHTConfig keeps BERT-base's defaults (a transformers class's own); the pipeline's models take every field
    params.yaml has from the profile (dht.model.FROM_PARAMS): here each set to a value unlike DHTConfig's default,
    and the built model has them all. Every key of the model: section, and dht.fixed_layers / group_size, that
    names a DHTConfig field is in FROM_PARAMS, so a new one cannot fall back to DHTConfig's default unnoticed."""
    import dataclasses
    from operator import attrgetter

    from conftest import ROOT

    from dht.config import DHTSection, ModelSection
    from dht.config_loading import load_config
    from dht.model import FROM_PARAMS, model_from_params

    fields = {f.name for f in dataclasses.fields(DHTConfig)}
    named = {f"model.{k}" for k in ModelSection.model_fields if k in fields}
    named |= {f"dht.{k}" for k in DHTSection.model_fields if k in fields}
    assert named == set(FROM_PARAMS.values()) and all(name in fields for name in FROM_PARAMS)
    cfg = load_config(ROOT / "params.yaml", profile="tiny")  # init: scratch
    unlike = {"hidden_size": 24, "num_hidden_layers": 4, "num_attention_heads": 6, "intermediate_size": 40,
              "hidden_dropout_prob": 0.05, "attention_probs_dropout_prob": 0.15, "max_position_embeddings": 40,
              "layer_norm": "pre", "residual_init_scale": 0.5, "classifier_pooling": "mean", "exit_heads": "per_depth",
              "fixed_layers": 1, "group_size": 1}
    assert set(unlike) == set(FROM_PARAMS)
    defaults = DHTConfig()
    assert all(getattr(defaults, name) != value for name, value in unlike.items())
    sections = {"model": {}, "dht": {}}
    for name, key in FROM_PARAMS.items():
        section, field = key.split(".")
        sections[section][field] = unlike[name]
    cfg = cfg.model_copy(update={s: getattr(cfg, s).model_copy(update=v) for s, v in sections.items()})
    assert all(attrgetter(key)(cfg) == unlike[name] for name, key in FROM_PARAMS.items())
    built = model_from_params(cfg, num_labels=3, vocab_size=50).config
    assert {name: getattr(built, name) for name in FROM_PARAMS} == unlike


def test_config_defaults_and_groups():
    config = DHTConfig()
    assert config.model_type == "dht-bert"
    assert (config.fixed_layers, config.group_size, config.num_labels) == (3, 3, 2)
    assert config.dynamic_layer_groups() == [range(3, 6), range(6, 9), range(9, 12)]
    uneven = DHTConfig(num_hidden_layers=8, fixed_layers=3, group_size=2)
    assert uneven.dynamic_layer_groups() == [range(3, 5), range(5, 7), range(7, 8)]


# ---- BERT parity and loading --------------------------------------------------------------------------------


def test_parameter_names_mirror_bert(bert):
    dht = make_dht()
    assert set(dht.state_dict()) == set(bert.state_dict())
    assert "bert.encoder.layer.5.attention.self.query.weight" in dht.state_dict()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_full_plan_matches_bert(bert, implementation):
    dht = make_dht(implementation)
    dht.load_state_dict(bert.state_dict(), strict=True)
    batch = make_batch()
    with torch.no_grad():
        expected = bert(**batch).logits
        got = dht(**batch).logits
        all_on = dht(
            **batch,
            depth=torch.full((8,), 6),
            heads=torch.ones(8, 6, 6, dtype=torch.bool),
        ).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(all_on, expected, atol=ATOL, rtol=0)


def test_from_bert_local_directory(tmp_path, bert):
    bert.save_pretrained(tmp_path)
    dht = DHTForSequenceClassification.from_bert(
        str(tmp_path),
        fixed_layers=2,
        group_size=2,
        attn_implementation="eager",
        load_kwargs={"local_files_only": True},
    ).eval()
    assert (dht.config.fixed_layers, dht.config.group_size, dht.config.num_labels) == (2, 2, 3)
    assert dht.config.attn_implementation == "eager"
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(dht(**batch).logits, bert(**batch).logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="architecture"):
        DHTForSequenceClassification.from_bert(str(tmp_path), num_hidden_layers=3)


def test_from_bert_new_label_count(tmp_path, bert):
    bert.save_pretrained(tmp_path)
    dht = DHTForSequenceClassification.from_bert(
        str(tmp_path), num_labels=5, load_kwargs={"ignore_mismatched_sizes": True}
    )
    assert dht.classifier.out_features == 5
    torch.testing.assert_close(
        dht.bert.encoder.layer[3].output.dense.weight, bert.bert.encoder.layer[3].output.dense.weight
    )


def test_save_and_load_round_trip(tmp_path):
    dht = make_dht("eager")
    dht.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dht-bert"
    assert (saved["fixed_layers"], saved["group_size"], saved["attn_implementation"]) == (2, 2, "eager")
    loaded = DHTForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.to_diff_dict() == dht.config.to_diff_dict()
    batch = make_batch()
    depth, heads = mixed_plan()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch, depth=depth, heads=heads).logits, dht(**batch, depth=depth, heads=heads).logits
        )
    switched = DHTForSequenceClassification.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert switched.config.attn_implementation == "sdpa"


# ---- the execution plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("implementation", "layer_norm"), [("sdpa", "post"), ("eager", "post"), ("sdpa", "pre")])
def test_sliced_equals_masked_for_mixed_plan(monkeypatch, implementation, layer_norm):
    gathered_calls = []
    original = DHTAttention._gathered

    def spy(self, *args, **kwargs):
        gathered_calls.append(args[2].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DHTAttention, "_gathered", spy)
    dht = make_dht(implementation, layer_norm=layer_norm, residual_init_scale=0.5 if layer_norm == "pre" else 1.0)
    batch = make_batch()
    depth, heads = mixed_plan()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with torch.no_grad():
        full = dht(**batch).logits
        sliced = dht(**batch, labels=labels, depth=depth, heads=heads, output_hidden_states=True)
        masked = dht(
            **batch,
            labels=labels,
            depth=depth,
            heads=heads,
            attention_path="masked",
            output_hidden_states=True,
        )
    torch.testing.assert_close(sliced.logits, masked.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(sliced.per_sample_loss, masked.per_sample_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(sliced.last_hidden_state, masked.last_hidden_state, atol=ATOL, rtol=0)
    assert len(sliced.hidden_states) == len(masked.hidden_states) == 7
    for s, m in zip(sliced.hidden_states, masked.hidden_states, strict=True):
        torch.testing.assert_close(s, m, atol=ATOL, rtol=0)
    assert gathered_calls  # the plan exercised both sliced branches (one set per group, gathered sets)
    # The plan matters: every sample gets different logits from the full model.
    changed = (sliced.logits - full).abs().amax(-1)
    assert changed[0] > 1e-3 and changed[1:].min() > 1e-3


@pytest.mark.parametrize("gather_per_sample", [True, False])
def test_equal_head_counts_with_different_sets(monkeypatch, gather_per_sample):
    """Per-sample head sets of one size: batched with gathered weights, or one sliced group per set."""
    monkeypatch.setattr(DHTAttention, "gather_per_sample", gather_per_sample)
    dht = make_dht("eager")
    batch = make_batch()
    g = torch.Generator().manual_seed(5)
    heads = torch.zeros(8, 6, 6, dtype=torch.bool)
    for i in range(8):
        for layer in range(6):
            heads[i, layer, torch.randperm(6, generator=g)[: 3 if i < 6 else 4]] = True
    assert torch.unique(heads[:, 3], dim=0).shape[0] > 2  # several different sets share a head count
    depth = torch.tensor([6, 5, 6, 4, 6, 6, 3, 6])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    outs, grads = {}, {}
    for path in ("sliced", "masked"):
        dht.zero_grad(set_to_none=True)
        outs[path] = dht(**batch, labels=labels, depth=depth, heads=heads, attention_path=path)
        outs[path].loss.backward()
        grads[path] = dht.bert.encoder.layer[3].attention.self.value.weight.grad.clone()
    torch.testing.assert_close(outs["sliced"].logits, outs["masked"].logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(grads["sliced"], grads["masked"], atol=ATOL, rtol=1e-4)


def test_sliced_gradients_equal_masked():
    depth, heads = mixed_plan()
    batch = make_batch()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    grads = {}
    for path in ("sliced", "masked"):
        dht = make_dht("eager")
        dht(**batch, labels=labels, depth=depth, heads=heads, attention_path=path).loss.backward()
        grads[path] = {name: p.grad for name, p in dht.named_parameters()}
    for name, g in grads["sliced"].items():
        other = grads["masked"][name]
        if g is None:  # no parameter is left untouched by this plan (depth 6 occurs)
            assert other is None or other.abs().max() == 0, name
            continue
        torch.testing.assert_close(g, other, atol=ATOL, rtol=1e-4, msg=name)


def test_uniform_pruning_matches_bert_with_zeroed_head_outputs(bert):
    """Independent reference: dropping head h == zeroing its columns of W_O in a plain (truncated) BERT."""
    depth_all, kept = 4, {0: None, 1: None, 2: [0, 3, 5], 3: [1]}
    reference = make_bert(num_hidden_layers=depth_all)
    state = {
        k: v.clone()
        for k, v in bert.state_dict().items()
        if not k.startswith(("bert.encoder.layer.4", "bert.encoder.layer.5"))
    }
    head = ARCH["hidden_size"] // ARCH["num_attention_heads"]
    for layer, heads_kept in kept.items():
        if heads_kept is None:
            continue
        w = state[f"bert.encoder.layer.{layer}.attention.output.dense.weight"]
        for h in set(range(ARCH["num_attention_heads"])) - set(heads_kept):
            w[:, h * head : (h + 1) * head] = 0.0
    reference.load_state_dict(state, strict=True)
    dht = make_dht()
    dht.load_state_dict(bert.state_dict())
    batch = make_batch()
    plan = head_mask_from_choices([[kept[layer] for layer in range(depth_all)]] * 8, 6, 6)
    with torch.no_grad():
        expected = reference(**batch).logits
        got = dht(**batch, depth=torch.full((8,), depth_all), heads=plan).logits
        full = dht(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - full).abs().max() > 1e-3


@pytest.mark.parametrize("layer_norm", ["post", "pre"])
def test_mixed_batch_equals_each_sample_alone(layer_norm):
    dht = make_dht(layer_norm=layer_norm)
    batch = make_batch()
    depth, heads = mixed_plan()
    with torch.no_grad():
        together = dht(**batch, depth=depth, heads=heads).logits
        for i in range(8):
            alone = dht(
                **{k: v[i : i + 1] for k, v in batch.items()}, depth=depth[i : i + 1], heads=heads[i : i + 1]
            )
            torch.testing.assert_close(alone.logits[0], together[i], atol=ATOL, rtol=0)


def test_layer_with_zero_heads_contributes_only_the_output_bias():
    dht = make_dht()
    batch = make_batch()
    heads = torch.ones(8, 6, 6, dtype=torch.bool)
    heads[:, 2] = False  # every sample: no head in layer 2 (one group, nothing computed)
    heads[:4, 4] = False  # half the samples: no head in layer 4 (two groups)
    with torch.no_grad():
        out = dht(**batch, heads=heads, output_hidden_states=True)
        masked = dht(**batch, heads=heads, attention_path="masked")
        for layer_idx in (2, 4):
            layer = dht.bert.encoder.layer[layer_idx]
            x = out.hidden_states[layer_idx]
            attention_output = layer.attention.output.LayerNorm(x + layer.attention.output.dense.bias)
            expected = layer.output(layer.intermediate(attention_output), attention_output)
            rows = slice(None) if layer_idx == 2 else slice(0, 4)
            torch.testing.assert_close(
                out.hidden_states[layer_idx + 1][rows], expected[rows], atol=ATOL, rtol=0
            )
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits, masked.logits, atol=ATOL, rtol=0)


def test_hidden_states_hold_last_state_after_depth():
    dht = make_dht()
    batch = make_batch()
    depth, heads = mixed_plan()
    with torch.no_grad():
        out = dht(**batch, depth=depth, heads=heads, output_hidden_states=True)
        embeddings = dht.bert.embeddings(batch["input_ids"], batch["token_type_ids"])
    states = out.hidden_states
    assert len(states) == ARCH["num_hidden_layers"] + 1
    torch.testing.assert_close(states[0], embeddings)
    for i, d in enumerate(depth.tolist()):
        torch.testing.assert_close(out.last_hidden_state[i], states[d][i])
        for later in range(d + 1, len(states)):
            assert torch.equal(states[later][i], states[d][i])
        if d >= 1:
            assert not torch.equal(states[d][i], states[d - 1][i])
    # All samples stopping early: the tuple still has N_L + 1 entries.
    short = dht(**batch, depth=torch.full((8,), 2), output_hidden_states=True)
    assert len(short.hidden_states) == 7 and torch.equal(short.hidden_states[6], short.hidden_states[2])


def test_encode_prefix_is_the_full_model_state_after_b_layers():
    dht = make_dht()
    batch = make_batch()
    with torch.no_grad():
        full = dht(**batch, output_hidden_states=True).hidden_states
        s1 = dht.encode_prefix(
            batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"]
        )
        three = dht.encode_prefix(
            batch["input_ids"], batch["attention_mask"], num_layers=3, token_type_ids=batch["token_type_ids"]
        )
    torch.testing.assert_close(s1, full[2], atol=ATOL, rtol=0)  # default: config.fixed_layers = 2
    torch.testing.assert_close(three, full[3], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="num_layers"):
        dht.encode_prefix(batch["input_ids"], num_layers=7)


def test_losses():
    dht = make_dht()
    batch = make_batch()
    depth, heads = mixed_plan()
    labels = torch.tensor([2, 1, 0, 0, 1, 2, 2, 1])
    out = dht(**batch, labels=labels, depth=depth, heads=heads)
    expected = F.cross_entropy(out.logits, labels, reduction="none")
    torch.testing.assert_close(out.per_sample_loss, expected)
    torch.testing.assert_close(out.loss, expected.mean())
    assert out.per_sample_loss.shape == (8,)
    unlabeled = dht(**batch)
    assert unlabeled.loss is None and unlabeled.per_sample_loss is None


def test_training_mode_backward_through_sliced_plan():
    dht = make_dht()
    dht.train()
    batch = make_batch()
    depth = torch.tensor([4, 2, 3, 4, 1, 2, 3, 4])  # no sample reaches layers 4 and 5
    _, heads = mixed_plan()
    heads[:, 3, 0] = False  # nobody keeps head 0 of layer 3
    out = dht(**batch, labels=torch.zeros(8, dtype=torch.long), depth=depth, heads=heads)
    out.loss.backward()
    for name, p in dht.named_parameters():
        if ".layer.4." in name or ".layer.5." in name:
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    query_grad = dht.bert.encoder.layer[3].attention.self.query.weight.grad
    assert query_grad[:8].abs().max() == 0  # head 0's rows: never computed, no gradient
    assert query_grad[8:].abs().max() > 0


def test_bfloat16_autocast_is_finite_and_close():
    dht = make_dht(initializer_range=0.02)
    batch = make_batch()
    depth, heads = mixed_plan()
    with torch.no_grad():
        reference = dht(**batch, depth=depth, heads=heads).logits
        for path in ("sliced", "masked"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = dht(**batch, depth=depth, heads=heads, attention_path=path, output_hidden_states=True)
            assert torch.isfinite(out.logits).all()
            torch.testing.assert_close(out.logits.float(), reference, atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    dht = make_dht()
    batch = make_batch()
    depth, heads = mixed_plan()
    with torch.no_grad():
        expected = dht(**batch, depth=depth, heads=heads).logits
        dht.to("cuda")
        got = dht(**{k: v.cuda() for k, v in batch.items()}, depth=depth.cuda(), heads=heads.cuda()).logits
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(depth=torch.full((8,), 7)), ValueError, "depth values"),
        (dict(depth=torch.full((8,), -1)), ValueError, "depth values"),
        (dict(depth=torch.full((7,), 2)), ValueError, "depth must"),
        (dict(depth=torch.full((8,), 2.0)), ValueError, "depth must"),
        (dict(heads=torch.ones(8, 5, 6, dtype=torch.bool)), ValueError, "heads must have shape"),
        (dict(heads=torch.ones(8, 6, 6)), TypeError, "BoolTensor"),
        (dict(attention_path="pruned"), ValueError, "attention_path"),
    ],
)
def test_invalid_plans_are_rejected(kwargs, error, message):
    dht = make_dht()
    with pytest.raises(error, match=message):
        dht(**make_batch(), **kwargs)


# ---- plan helpers -------------------------------------------------------------------------------------------


def test_head_mask_from_choices():
    mask = head_mask_from_choices([[None, [0, 2], []], [[5]]], num_layers=4, num_heads=6)
    assert mask.shape == (2, 4, 6) and mask.dtype == torch.bool
    assert mask[0, 0].all() and mask[0, 3].all() and not mask[0, 2].any()
    assert mask[0, 1].tolist() == [True, False, True, False, False, False]
    assert mask[1, 0].tolist() == [False] * 5 + [True] and mask[1, 1:].all()
    with pytest.raises(ValueError, match="out of range"):
        head_mask_from_choices([[[6]]], num_layers=4, num_heads=6)


def test_head_mask_from_groups():
    config = DHTConfig(**ARCH, fixed_layers=2, group_size=2)  # groups: layers (2, 3) and (4, 5)
    mask = head_mask_from_groups([[[0, 1], [4]], [None, []]], config)
    assert mask.shape == (2, 6, 6)
    assert mask[:, :2].all()  # fixed layers keep every head
    for layer in (2, 3):
        assert mask[0, layer].nonzero().flatten().tolist() == [0, 1]
        assert mask[1, layer].all()
    for layer in (4, 5):
        assert mask[0, layer].nonzero().flatten().tolist() == [4]
        assert not mask[1, layer].any()
    with pytest.raises(ValueError, match="groups"):
        head_mask_from_groups([[None, None, None]], config)


# ---- pre-LN, for training from scratch ------------------------------------------------------------------------


def _pre_ln_reference(dht: DHTForSequenceClassification, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """x + Att(LN1(x)), then + FFN(LN2(x)) per layer, final LayerNorm, pooler, classifier: written out from the
    weights, independent of DHTAttention's code paths."""
    x = dht.bert.embeddings(batch["input_ids"], batch["token_type_ids"])
    keep = batch["attention_mask"].bool()[:, None, None, :]
    n_heads, d_head = ARCH["num_attention_heads"], ARCH["hidden_size"] // ARCH["num_attention_heads"]
    for layer in dht.bert.encoder.layer:
        sa, att_out = layer.attention.self, layer.attention.output
        h = att_out.LayerNorm(x)
        q, k, v = (lin(h).view(*h.shape[:2], n_heads, d_head).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
        scores = (q @ k.transpose(-1, -2)) / d_head**0.5
        context = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v
        x = x + att_out.dense(context.transpose(1, 2).reshape(h.shape))
        x = x + layer.output.dense(layer.intermediate(layer.output.LayerNorm(x)))
    cls = dht.bert.final_layer_norm(x)[:, 0]
    return dht.classifier(torch.tanh(dht.bert.pooler.dense(cls)))


def test_pre_ln_matches_the_written_out_formula():
    dht = make_dht("eager", layer_norm="pre", residual_init_scale=0.5)
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(dht(**batch).logits, _pre_ln_reference(dht, batch), atol=ATOL, rtol=0)
        post = make_dht("eager")
        assert (post(**batch).logits - dht(**batch).logits).abs().max() > 1e-2  # the two really differ


def test_zero_residual_init_starts_as_identity_and_still_learns():
    dht = make_dht(layer_norm="pre", residual_init_scale=0.0).train()
    assert "bert.final_layer_norm.weight" in dict(dht.named_parameters())
    batch = make_batch()
    out = dht(**batch, labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), output_hidden_states=True)
    dht.eval()
    with torch.no_grad():
        states = dht(**batch, output_hidden_states=True).hidden_states
    for state in states[1:]:  # every layer adds exactly its (zero) output biases
        torch.testing.assert_close(state, states[0], atol=ATOL, rtol=0)
    out.loss.backward()
    grad = dht.bert.encoder.layer[-1].output.dense.weight.grad
    assert grad is not None and grad.abs().max() > 0  # pre-LN: the zeroed branch still gets a gradient


def test_pre_ln_save_load_and_checkpoint_refusal(tmp_path, bert):
    dht = make_dht(layer_norm="pre", residual_init_scale=0.5)
    dht.save_pretrained(tmp_path / "pre")
    loaded = DHTForSequenceClassification.from_pretrained(tmp_path / "pre").eval()
    assert loaded.config.layer_norm == "pre"
    batch = make_batch()
    depth, heads = mixed_plan()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, depth=depth, heads=heads).logits,
                                   dht(**batch, depth=depth, heads=heads).logits)
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="post-LN"):
        DHTForSequenceClassification.from_bert(str(tmp_path / "bert"), layer_norm="pre")


def test_mean_pooling_reads_only_real_tokens_and_skips_the_pooler():
    """classifier_pooling='mean': the classifier reads the mean of each sample's non-padding token states (how
    sentence-embedding checkpoints were trained), so padding a sample does not change its logits, and the pooler
    takes no part (no gradient reaches it)."""
    model = make_dht(classifier_pooling="mean")
    batch = make_batch()
    short = batch["attention_mask"][1].sum().item()
    assert short < batch["input_ids"].shape[1]  # sample 1 is padded
    logits = model(**batch).logits
    alone = model(input_ids=batch["input_ids"][1:2, :short], token_type_ids=batch["token_type_ids"][1:2, :short]).logits
    torch.testing.assert_close(logits[1:2], alone, atol=ATOL, rtol=0)
    # The stepwise path (embed / run_layers / classify with the key mask) gives the forward's logits.
    hidden, keep = model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    stepwise = model.classify(model.run_layers(hidden, keep, 0, ARCH["num_hidden_layers"]), keep)
    torch.testing.assert_close(stepwise, logits, atol=ATOL, rtol=0)
    # Mean pooling is not the [CLS] pooler: the same weights under 'cls' give other logits.
    cls_model = make_dht()
    assert (cls_model(**batch).logits - logits).abs().max() > 1e-2
    model.train()
    model(**batch, labels=torch.zeros(8, dtype=torch.long)).loss.backward()
    assert model.bert.pooler.dense.weight.grad is None
    assert model.classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="classifier_pooling"):
        DHTConfig(**ARCH, classifier_pooling="max")
