"""model.exit_heads (docs/training.md T29): one pooler + classifier read at every depth (`shared`, every model
before the key) or one per exit depth b, b + c, ..., N_L (`per_depth`), each starting as a copy of the full-depth
head."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from test_model import ATOL, make_batch, make_bert, make_dht
from test_trainer import SEQ, make_cfg, setup  # noqa: F401 (setup is a fixture)
from torch.utils.flop_counter import FlopCounterMode

from dht.baselines.distil import student_from_teacher
from dht.config import Config
from dht.flops import forward_flops
from dht.model import DHTConfig, DHTForSequenceClassification
from dht.policy import exit_uncertainty, predict
from dht.trainer import Trainer
from dht.walk import exit_logits

EXITS = [2, 4, 6]  # test_model's make_dht: 6 layers, b = c = 2


def states(model, batch, depth):
    hidden, keep = model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return model.run_layers(hidden, keep, 0, depth), keep


def written_out(pooler, classifier, last):
    """BERT's head on the [CLS] state (post-LN, eval: no final LayerNorm, no dropout), from its weights."""
    return classifier(torch.tanh(pooler.dense(last[:, 0])))


def perturb_heads(model):
    """Make every exit head differ from the others (after training they would)."""
    with torch.no_grad():
        for depth, head in model.exit_heads.items():
            head.classifier.weight.mul_(1.0 + int(depth) / 4).add_(0.1 * int(depth))
            head.pooler.dense.bias.add_(0.05 * int(depth))
    return model


# ---- shared: the model as it was ------------------------------------------------------------------------------


def test_shared_is_bit_identical_to_a_model_built_without_the_key():
    before = make_dht()  # a config without the key: every model written before it
    shared = make_dht(exit_heads="shared")
    assert before.config.exit_heads == "shared" and not hasattr(shared, "exit_heads")
    assert before.state_dict().keys() == shared.state_dict().keys()
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in before.state_dict().items())
    batch = make_batch()
    with torch.no_grad():
        for depth in EXITS:
            last, keep = states(before, batch, depth)
            expected = before.classify(last, keep)
            assert torch.equal(shared.classify(last, keep, depth), expected)  # the depth changes nothing
            assert torch.equal(expected, written_out(before.bert.pooler, before.classifier, last))
        plan = torch.tensor([6, 2, 4, 6, 2, 4, 2, 6])
        assert torch.equal(shared(**batch, depth=plan).logits, before(**batch, depth=plan).logits)


def test_per_depth_starts_as_the_shared_model():
    """Its heads are copies of the full-depth head made without drawing from the RNG: the same weights and
    bit-identical logits at every depth as the shared model of the same seed."""
    shared, per_depth = make_dht(), make_dht(exit_heads="per_depth")
    extra = sorted(set(per_depth.state_dict()) - set(shared.state_dict()))
    assert extra == [f"exit_heads.{d}.{part}.{p}" for d in (2, 4) for part in ("classifier", "pooler.dense")
                     for p in ("bias", "weight")]
    assert all(torch.equal(v, per_depth.state_dict()[k]) for k, v in shared.state_dict().items())
    batch = make_batch()
    with torch.no_grad():
        for depth in EXITS:
            last, keep = states(shared, batch, depth)
            assert torch.equal(per_depth.classify(last, keep, depth), shared.classify(last, keep, depth))
    # the heads are copies, not the same tensors
    assert per_depth.exit_heads["2"].classifier.weight.data_ptr() != per_depth.classifier.weight.data_ptr()


# ---- per_depth: each depth its own head --------------------------------------------------------------------------


def test_each_depth_is_read_by_its_own_head():
    model = perturb_heads(make_dht(exit_heads="per_depth"))
    batch = make_batch()
    with torch.no_grad():
        reads = {}
        for depth in EXITS:
            last, keep = states(model, batch, depth)
            pooler, classifier = model.exit_head(depth)
            reads[depth] = model.classify(last, keep, depth)
            torch.testing.assert_close(reads[depth], written_out(pooler, classifier, last), atol=ATOL, rtol=0)
        # the full depth keeps BERT's names; the shallower exits read other weights than it
        assert model.exit_head(6) == (model.bert.pooler, model.classifier) == model.exit_head(None)
        last, keep = states(model, batch, 4)
        assert (model.classify(last, keep, 4) - model.classify(last, keep, 6)).abs().max() > 1e-2
        # the forward groups samples by depth and reads each with its depth's head
        plan = torch.tensor([6, 2, 4, 6, 2, 4, 2, 6])
        logits = model(**batch, depth=plan).logits
        for i, depth in enumerate(plan.tolist()):
            torch.testing.assert_close(logits[i], reads[depth][i], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"no head reads depth \[3\]; the exit depths are \[2, 4, 6\]"):
        model(**batch, depth=torch.tensor([3, 2, 4, 6, 2, 4, 2, 6]))
    with pytest.raises(ValueError, match="no head reads depth 3"):
        model.classify(states(model, batch, 3)[0], None, 3)


def test_mean_pooling_heads_have_no_pooler():
    model = make_dht(exit_heads="per_depth", classifier_pooling="mean")
    assert model.exit_heads["2"].pooler is None
    assert not [n for n in model.state_dict() if n.startswith("exit_heads.") and ".pooler." in n]
    with pytest.raises(ValueError, match="exit_heads"):
        DHTConfig(vocab_size=8, hidden_size=8, num_attention_heads=2, exit_heads="per_layer")


def test_save_load_round_trip_and_a_directory_without_the_key(tmp_path):
    model = perturb_heads(make_dht(exit_heads="per_depth"))
    model.save_pretrained(tmp_path / "per_depth")
    assert json.loads((tmp_path / "per_depth" / "config.json").read_text())["exit_heads"] == "per_depth"
    with safe_open(tmp_path / "per_depth" / "model.safetensors", "pt") as fh:
        assert {"exit_heads.2.classifier.weight", "exit_heads.4.pooler.dense.bias"} <= set(fh.keys())
    loaded = DHTForSequenceClassification.from_pretrained(tmp_path / "per_depth").eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    batch, plan = make_batch(), torch.tensor([6, 2, 4, 6, 2, 4, 2, 6])
    with torch.no_grad():
        assert torch.equal(loaded(**batch, depth=plan).logits, model(**batch, depth=plan).logits)

    # a model directory saved before the key: loads as shared, as it was trained
    old = make_dht()
    old.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["exit_heads"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    reloaded = DHTForSequenceClassification.from_pretrained(tmp_path / "old").eval()
    assert reloaded.config.exit_heads == "shared" and not hasattr(reloaded, "exit_heads")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch, depth=plan).logits, old(**batch, depth=plan).logits)
        # ... and switched to per-depth heads, each exit starts from its one (trained) head
        reloaded.set_exit_heads("per_depth")
        for depth in EXITS:
            last, keep = states(old, batch, depth)
            assert torch.equal(reloaded.classify(last, keep, depth), old.classify(last, keep))
        reloaded.set_exit_heads("shared")
    assert not hasattr(reloaded, "exit_heads") and reloaded.config.exit_heads == "shared"


def test_a_bert_checkpoint_gives_every_exit_its_head(tmp_path):
    bert = make_bert()
    bert.save_pretrained(tmp_path / "bert")
    model = DHTForSequenceClassification.from_bert(str(tmp_path / "bert"), fixed_layers=2, group_size=2,
                                                   exit_heads="per_depth")
    assert model.config.exit_heads == "per_depth" and sorted(model.exit_heads) == ["2", "4"]
    for head in model.exit_heads.values():
        assert torch.equal(head.classifier.weight, bert.classifier.weight)
        assert torch.equal(head.pooler.dense.weight, bert.bert.pooler.dense.weight)


def test_a_per_depth_reference_still_teaches_a_distil_student():
    """A baseline reads its full depth alone: a DistilBERT student of a per-depth reference has one head, the
    reference's full-depth one."""
    teacher = perturb_heads(make_dht(exit_heads="per_depth"))
    student = student_from_teacher(teacher, 3)
    assert student.config.exit_heads == "shared" and not hasattr(student, "exit_heads")
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_a_per_depth_exit_costs_what_a_shared_one_costs():
    """One head runs per read, of the shared head's shapes: dht.flops counts either reading (FlopCounterMode)."""
    torch.manual_seed(0)
    conf = DHTConfig(vocab_size=64, hidden_size=96, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=192, max_position_embeddings=32, num_labels=4, attn_implementation="eager",
                     exit_heads="per_depth")
    model = DHTForSequenceClassification(conf).eval()
    ids = torch.randint(1, 64, (4, 16))
    depth = torch.tensor([3, 6, 12, 9])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, depth=depth)
    assert counter.get_total_flops() == sum(forward_flops(16, [12] * d, conf) for d in depth.tolist())


# ---- training: every search mode, T23/T24/T26 ---------------------------------------------------------------------


def per_depth_cfg(**modes) -> Config:
    raw = make_cfg().model_dump(mode="json")
    raw["model"]["exit_heads"] = "per_depth"
    for mode, fields in modes.items():
        raw["dht"]["modes"][mode].update(fields)
    return Config.model_validate(raw)


def per_depth_trainer(setup, mode, cfg):  # noqa: F811
    model, feats, train, _ = setup
    model = copy.deepcopy(model)
    model.set_exit_heads("per_depth")  # before the optimizer is built, as dht.trainer.initial_model does
    torch.manual_seed(cfg.training_seed)
    return Trainer(cfg, mode, model, feats, train, torch.device("cpu"), SEQ)


def head_params(model) -> dict[int, list[torch.Tensor]]:
    """Each exit depth's head parameters (the full depth's: bert.pooler and classifier)."""
    out = {int(d): list(h.parameters()) for d, h in model.exit_heads.items()}
    out[model.config.num_hidden_layers] = [*model.bert.pooler.parameters(), *model.classifier.parameters()]
    return out


@pytest.mark.parametrize("exit_loss", ["chosen", "path"])
def test_the_gradient_reaches_only_the_heads_a_path_reads(setup, exit_loss):  # noqa: F811
    cfg = per_depth_cfg(**{"t-dht": {"exit_loss": exit_loss, "depth_feedback": "all_depths"}})
    trainer = per_depth_trainer(setup, "t-dht", cfg)
    policy = trainer.policy
    assert policy.layer_options == [3, 6, 9, 12]
    items = [(i, policy.layer_options.index(9), torch.zeros(policy.context_size)) for i in range(8)]
    trainer.train_batch(policy, False, 9, items)
    read = {9} | ({3, 6} if exit_loss == "path" else set())
    for depth, params in head_params(trainer.model).items():
        grads = [p.grad for p in params if p.grad is not None and p.grad.abs().sum() > 0]
        assert (len(grads) == len(params)) if depth in read else not grads, depth


@pytest.mark.parametrize("mode", ["t-dht", "f-dht", "p-dht", "vanilla-3"])
def test_every_search_mode_trains_the_heads_it_reads(setup, mode):  # noqa: F811
    """A head changes exactly when training read it: the depths the bandits chose (and with exit_loss: path every
    depth option a chosen path passes); a fixed mode trains its depth's head alone. T-DHT also runs T23's exit
    confidence and T24's all-depths reads, which read each depth's head without training it."""
    levers = {"exit_loss": "path", "depth_feedback": "all_depths"} if mode == "t-dht" else {}
    cfg = per_depth_cfg(**({mode: levers} if levers else {}))
    if mode == "t-dht":
        raw = cfg.model_dump(mode="json")
        raw["dht"]["features"]["exit_confidence"] = True
        cfg = Config.model_validate(raw)
    trainer = per_depth_trainer(setup, mode, cfg)
    before = {d: [p.detach().clone() for p in ps] for d, ps in head_params(trainer.model).items()}
    progress = trainer.fit(progress_bar=False)
    chosen = {int(k.split("/")[1]) for epoch in progress.selections.values() for k in epoch if k.startswith("layers/")}
    options = set(trainer.policy.layer_options) | set(getattr(trainer.warmup_policy, "layer_options", []))
    trained = {d for d in options if any(d <= c for c in chosen)} if mode == "t-dht" else chosen
    for depth, params in head_params(trainer.model).items():
        changed = any(not torch.equal(p, q) for p, q in zip(params, before[depth], strict=True))
        assert changed == (depth in trained), (depth, chosen)
    test = setup[3]
    pred = predict(trainer.model, trainer.policy, test, torch.device("cpu"), 16, SEQ)
    assert set(pred.layers.tolist()) <= set(trainer.model.config.exit_depths())
    if mode == "vanilla-3":  # every head, one depth: inference reads that depth's head
        with torch.no_grad():
            logits = exit_logits(trainer.model.eval(), test.input_ids, test.attention_mask, [3])[0]
        torch.testing.assert_close(pred.probs, logits.softmax(-1), atol=ATOL, rtol=0)


def test_exit_reads_use_each_depths_head(setup):  # noqa: F811
    """dht.walk.exit_logits (T24's reads, the levers' ladder) and exit_uncertainty (T23, on S1 after b layers)."""
    model = copy.deepcopy(setup[0])
    model.set_exit_heads("per_depth")
    perturb_heads(model).eval()
    data = setup[3]
    ids, mask = data.input_ids[:8], data.attention_mask[:8]
    keep = mask.bool()
    with torch.no_grad():
        reads = exit_logits(model, ids, mask, [3, 6, 9, 12])
        for depth, logits in zip([3, 6, 9, 12], reads, strict=True):
            hidden, _ = model.embed(ids, mask)
            last = model.run_layers(hidden, keep, 0, depth)
            assert torch.equal(logits, model.classify(last, keep, depth))
            if depth < 12:
                assert (logits - model.classify(last, keep, 12)).abs().max() > 1e-3
        s1 = model.encode_prefix(ids, mask)
        expected = 1 - model.classify(s1, keep, 3).softmax(-1).max(-1).values
        torch.testing.assert_close(exit_uncertainty(model, s1, mask), expected)
