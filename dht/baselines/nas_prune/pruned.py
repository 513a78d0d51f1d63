"""Extraction (report Section 5.5): the architecture the masks keep (:func:`derive_arch`, :func:`fit_threshold`),
the physically smaller BERT that runs it (:class:`PrunedBert`), and its weights copied from the teacher
(:func:`extract`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from dht.baselines.nas_prune.arch import LayerArch, PrunedArch, teacher_fields
from dht.baselines.nas_prune.cost import Convention, pruned_flops
from dht.baselines.nas_prune.masks import additive_mask, mean_pool, unit_gates
from dht.model import DHTForSequenceClassification

KEEP_THRESHOLD = 0.01  # Section 5.5.1: "choose the dimensions ... sigmoid(alpha) > 0.01"
ARCH_FILE = "pruned_arch.json"
WEIGHTS_FILE = "pruned_model.pt"


def derive_arch(alphas: dict[str, Tensor], fields: dict[str, Any], threshold: float = KEEP_THRESHOLD) -> PrunedArch:
    """The discrete architecture whose units have a gate above ``threshold`` (Section 5.5).

    * Dimensions: kept where ``sigmoid(alpha) > threshold`` (Section 5.5.1; the report's threshold is 0.01). If no
      embedding dimension survives, the one with the largest alpha is kept (a LayerNorm needs one dimension).
    * Heads: kept where ``N_H * softmax(alpha)_h > threshold``: in every layer these are the top-n_l heads by alpha
      (Section 5.5.2, "choose the heads according to the top-n alpha"), n_l set by the same threshold as the
      dimensions. A kept head also needs at least one kept value dimension (otherwise it adds exactly 0).
    """
    gates = unit_gates(alphas)
    n_heads = fields["num_attention_heads"]
    dh = fields["hidden_size"] // n_heads
    embed = (gates["embed"] > threshold).nonzero().flatten().tolist()
    if not embed:
        embed = [int(alphas["embed"].argmax())]
    layers = []
    for i in range(alphas["qk"].shape[0]):
        heads, qk_dims, v_dims = [], [], []
        for h in (gates["heads"][i] > threshold).nonzero().flatten().tolist():
            block = slice(h * dh, (h + 1) * dh)
            vd = (gates["v"][i, block] > threshold).nonzero().flatten().tolist()
            if not vd:
                continue
            heads.append(h)
            qk_dims.append((gates["qk"][i, block] > threshold).nonzero().flatten().tolist())
            v_dims.append(vd)
        ffn = (gates["ffn"][i] > threshold).nonzero().flatten().tolist()
        layers.append(LayerArch(heads, qk_dims, v_dims, ffn))
    return PrunedArch(embed, layers, **fields)


def fit_threshold(alphas: dict[str, Tensor], fields: dict[str, Any], target: float, tolerance: float,
                  seq_len: int, convention: Convention = "full",
                  threshold: float = KEEP_THRESHOLD) -> tuple[float, PrunedArch]:
    """The keep threshold of the extracted architecture, and that architecture.

    The report's threshold (0.01) when its architecture costs within the band ``[(1 - t) R, (1 + t) R]``.
    Otherwise the masks were not driven to 0/1 (the report's own searches ended 0.16 above a 0.5 target,
    Section 5.6) and the threshold moves, over the gate values, to the nearest value that enters the band: the
    smallest threshold above 0.01 whose architecture costs at most (1 + t) R, or the largest one below 0.01 that
    costs at least (1 - t) R. The units then removed (or added) are those the search valued least (most). FLOPs
    do not increase with the threshold, so a bisection over the sorted gate values finds it.
    """
    def cost(tau: float) -> float:
        return pruned_flops(derive_arch(alphas, fields, tau), seq_len, convention)

    base = derive_arch(alphas, fields, threshold)
    base_cost = pruned_flops(base, seq_len, convention)
    hi, lo = (1 + tolerance) * target, (1 - tolerance) * target
    if lo <= base_cost <= hi:
        return threshold, base
    values = torch.cat([g.flatten() for g in unit_gates(alphas).values()]).double().unique().tolist()
    if base_cost > hi:
        cands = [v for v in values if v > threshold]  # ascending; keep units with gate > tau
        if not cands or cost(cands[-1]) > hi:
            tau = cands[-1] if cands else threshold
            return tau, derive_arch(alphas, fields, tau)
        left, right = 0, len(cands) - 1  # smallest index with cost <= hi
        while left < right:
            mid = (left + right) // 2
            if cost(cands[mid]) <= hi:
                right = mid
            else:
                left = mid + 1
        return cands[left], derive_arch(alphas, fields, cands[left])
    cands = [0.0] + [v for v in values if v < threshold]  # ascending
    left, right = 0, len(cands) - 1  # largest index with cost >= lo
    if cost(cands[0]) < lo:
        return cands[0], derive_arch(alphas, fields, cands[0])
    while left < right:
        mid = (left + right + 1) // 2
        if cost(cands[mid]) >= lo:
            left = mid
        else:
            right = mid - 1
    return cands[left], derive_arch(alphas, fields, cands[left])


class _Dense(nn.Module):
    """``nn.Linear`` that accepts zero input or output features (a fully pruned FFN or attention).

    Parameters are created empty-valued (zeros): they are always copied from the teacher or loaded."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _PrunedLayer(nn.Module):
    """One layer of :class:`PrunedBert`: heads of their own Q/K and V widths, FFN of its own width.

    ``arch.layer_norm`` places the two LayerNorms as the teacher's :class:`dht.model.DHTLayer` does: post-LN
    ``attention_norm(x + attn(x))``, ``output_norm(x + ffn(x))``; pre-LN ``x + attn(attention_norm(x))``,
    ``x + ffn(output_norm(x))`` (the same teacher LayerNorms are copied into them either way).
    """

    def __init__(self, layer: LayerArch, arch: PrunedArch) -> None:
        super().__init__()
        de = arch.embed_width
        self.qk_widths = [len(d) for d in layer.qk_dims]
        self.v_widths = [len(d) for d in layer.v_dims]
        self.query = _Dense(de, sum(self.qk_widths))
        self.key = _Dense(de, sum(self.qk_widths))
        self.value = _Dense(de, sum(self.v_widths))
        self.attention_output = _Dense(sum(self.v_widths), de)
        self.attention_norm = nn.LayerNorm(de, eps=arch.layer_norm_eps)
        self.intermediate = _Dense(de, len(layer.ffn_dims))
        self.output = _Dense(len(layer.ffn_dims), de)
        self.output_norm = nn.LayerNorm(de, eps=arch.layer_norm_eps)
        self.act = ACT2FN[arch.hidden_act]
        self.scale = 1.0 / math.sqrt(arch.head_size)  # the teacher's scale: kept dims see the same logits
        self.p_hidden, self.p_attn = arch.hidden_dropout_prob, arch.attention_probs_dropout_prob
        self.pre_ln = arch.layer_norm == "pre"

    def _attention(self, x: Tensor, add_mask: Tensor | None) -> Tensor:
        if not self.v_widths:
            return self.attention_output(x.new_zeros(*x.shape[:-1], 0))  # no head: the output bias
        batch, n, _ = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        p_attn = self.p_attn if self.training else 0.0
        if len(set(self.qk_widths)) == 1 and len(set(self.v_widths)) == 1:
            # Same widths in every head: one batched attention.
            h = len(self.v_widths)

            def split(t: Tensor, w: int) -> Tensor:
                return t.view(batch, n, h, w).transpose(1, 2)

            context = self._attend(split(q, self.qk_widths[0]), split(k, self.qk_widths[0]),
                                   split(v, self.v_widths[0]), add_mask, p_attn)
            return self.attention_output(context.transpose(1, 2).reshape(batch, n, -1))
        pieces = [
            self._attend(qh, kh, vh, add_mask, p_attn)
            for qh, kh, vh in zip(q.split(self.qk_widths, -1), k.split(self.qk_widths, -1),
                                  v.split(self.v_widths, -1), strict=True)
        ]
        return self.attention_output(torch.cat(pieces, dim=-1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, add_mask: Tensor | None, p_attn: float) -> Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if add_mask is not None:
            scores = scores + (add_mask if scores.dim() == 4 else add_mask[:, 0])
        return torch.matmul(F.dropout(torch.softmax(scores, dim=-1), p_attn, self.training), v)

    def forward(self, x: Tensor, add_mask: Tensor | None) -> Tensor:
        p = self.p_hidden if self.training else 0.0
        if self.pre_ln:
            x = x + F.dropout(self._attention(self.attention_norm(x), add_mask), p, self.training)
            return x + F.dropout(self.output(self.act(self.intermediate(self.output_norm(x)))), p, self.training)
        x = self.attention_norm(F.dropout(self._attention(x, add_mask), p, self.training) + x)
        inter = self.act(self.intermediate(x))
        return self.output_norm(F.dropout(self.output(inter), p, self.training) + x)


class PrunedBert(nn.Module):
    """The searched architecture as a physically smaller BERT classifier.

    Hidden (residual-stream) width ``d_e = len(arch.embed_dims)`` everywhere; per layer its own query/key and
    value widths (per head) and FFN width; LayerNorms over the kept dimensions; the pooler maps d_e -> d (the
    teacher's width) and the classifier d -> num_labels. Eager attention (what FlopCounterMode counts). Post-LN
    BERT, or pre-LN when the teacher was (``arch.layer_norm``): then ``final_norm`` (the teacher's
    ``bert.final_layer_norm`` over the kept dimensions) normalises the last hidden states before the pooler; a
    post-LN model has no ``final_norm``, so its state dict is the one saved before pre-LN existed. With
    ``arch.classifier_pooling == "mean"`` there is no pooler: the classifier maps the mean of the real tokens'
    d_e-wide states to num_labels.
    """

    def __init__(self, arch: PrunedArch) -> None:
        super().__init__()
        self.arch = arch
        de = arch.embed_width
        self.word_embeddings = nn.Embedding(arch.vocab_size, de, padding_idx=arch.pad_token_id)
        self.position_embeddings = nn.Embedding(arch.max_position_embeddings, de)
        self.token_type_embeddings = nn.Embedding(arch.type_vocab_size, de)
        self.embedding_norm = nn.LayerNorm(de, eps=arch.layer_norm_eps)
        self.layers = nn.ModuleList([_PrunedLayer(layer, arch) for layer in arch.layers])
        if arch.layer_norm == "pre":
            self.final_norm = nn.LayerNorm(de, eps=arch.layer_norm_eps)
        if arch.classifier_pooling == "mean":
            self.classifier = _Dense(de, arch.num_labels)
        else:
            self.pooler = _Dense(de, arch.hidden_size)
            self.classifier = _Dense(arch.hidden_size, arch.num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, num_labels]."""
        n = input_ids.shape[1]
        if n > self.arch.max_position_embeddings:
            raise ValueError(f"sequence length {n} exceeds max_position_embeddings={self.arch.max_position_embeddings}")
        p = self.arch.hidden_dropout_prob if self.training else 0.0
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))
             + self.position_embeddings(torch.arange(n, device=input_ids.device))[None])
        x = F.dropout(self.embedding_norm(x), p, self.training)
        add_mask = additive_mask(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, add_mask)
        if self.arch.layer_norm == "pre":
            x = self.final_norm(x)
        if self.arch.classifier_pooling == "mean":
            pooled = mean_pool(x, attention_mask)
        else:
            pooled = torch.tanh(self.pooler(x[:, 0]))
        p_cls = self.arch.classifier_dropout if self.arch.classifier_dropout is not None else self.arch.hidden_dropout_prob
        return self.classifier(F.dropout(pooled, p_cls if self.training else 0.0, self.training))

    def flops(self, seq_len: int, convention: Convention = "full") -> int:
        return pruned_flops(self.arch, seq_len, convention)

    def save(self, out_dir: str | Path) -> None:
        """``pruned_arch.json`` (the architecture, with the teacher indices) and ``pruned_model.pt`` (state dict)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ARCH_FILE).write_text(json.dumps(self.arch.to_dict()) + "\n")
        torch.save(self.state_dict(), out_dir / WEIGHTS_FILE)

    @classmethod
    def load(cls, out_dir: str | Path, map_location: str | torch.device = "cpu") -> PrunedBert:
        """The model written by :meth:`save` (in eval mode)."""
        out_dir = Path(out_dir)
        model = cls(PrunedArch.from_dict(json.loads((out_dir / ARCH_FILE).read_text())))
        state = torch.load(out_dir / WEIGHTS_FILE, map_location=map_location, weights_only=True)
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()


def extract(teacher: DHTForSequenceClassification, arch: PrunedArch) -> PrunedBert:
    """Build the pruned model of ``arch`` (a search's ``SearchResult.arch``) and copy the kept rows/columns of the
    teacher's weights.

    The weights come from the teacher, not from the supernet's search-time weights: the report re-initialises the
    extracted architecture from the un-searched model (Section 5.2, step 3), as DARTS retrains the derived
    architecture. Returns the model in eval mode, on the teacher's device.
    """
    fields = teacher_fields(teacher)
    for key, value in fields.items():
        if key not in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout") and \
                getattr(arch, key) != value:
            raise ValueError(f"architecture {key}={getattr(arch, key)!r} does not match the teacher's {value!r}")
    model = PrunedBert(arch)
    bert = teacher.bert
    dh = arch.head_size
    e = torch.tensor(arch.embed_dims, dtype=torch.long)
    with torch.no_grad():
        emb = bert.embeddings
        model.word_embeddings.weight.copy_(emb.word_embeddings.weight[:, e])
        model.position_embeddings.weight.copy_(emb.position_embeddings.weight[:, e])
        model.token_type_embeddings.weight.copy_(emb.token_type_embeddings.weight[:, e])
        model.embedding_norm.weight.copy_(emb.LayerNorm.weight[e])
        model.embedding_norm.bias.copy_(emb.LayerNorm.bias[e])
        for spec, dst, src in zip(arch.layers, model.layers, bert.encoder.layer, strict=True):
            qk = torch.tensor([h * dh + j for h, dims in zip(spec.heads, spec.qk_dims, strict=True) for j in dims],
                              dtype=torch.long)
            v = torch.tensor([h * dh + j for h, dims in zip(spec.heads, spec.v_dims, strict=True) for j in dims],
                             dtype=torch.long)
            f = torch.tensor(spec.ffn_dims, dtype=torch.long)
            sa, so = src.attention.self, src.attention.output
            for d_lin, s_lin, rows in ((dst.query, sa.query, qk), (dst.key, sa.key, qk), (dst.value, sa.value, v)):
                d_lin.weight.copy_(s_lin.weight[rows][:, e])
                d_lin.bias.copy_(s_lin.bias[rows])
            dst.attention_output.weight.copy_(so.dense.weight[e][:, v])
            dst.attention_output.bias.copy_(so.dense.bias[e])
            dst.attention_norm.weight.copy_(so.LayerNorm.weight[e])
            dst.attention_norm.bias.copy_(so.LayerNorm.bias[e])
            dst.intermediate.weight.copy_(src.intermediate.dense.weight[f][:, e])
            dst.intermediate.bias.copy_(src.intermediate.dense.bias[f])
            dst.output.weight.copy_(src.output.dense.weight[e][:, f])
            dst.output.bias.copy_(src.output.dense.bias[e])
            dst.output_norm.weight.copy_(src.output.LayerNorm.weight[e])
            dst.output_norm.bias.copy_(src.output.LayerNorm.bias[e])
        if arch.layer_norm == "pre":
            model.final_norm.weight.copy_(bert.final_layer_norm.weight[e])
            model.final_norm.bias.copy_(bert.final_layer_norm.bias[e])
        if arch.classifier_pooling == "mean":
            # The mean of a stream that is zero outside the kept dimensions: only their classifier columns
            # act.
            model.classifier.weight.copy_(teacher.classifier.weight[:, e])
        else:
            model.pooler.weight.copy_(bert.pooler.dense.weight[:, e])
            model.pooler.bias.copy_(bert.pooler.dense.bias)
            model.classifier.weight.copy_(teacher.classifier.weight)
        model.classifier.bias.copy_(teacher.classifier.bias)
    return model.to(next(teacher.parameters()).device).eval()
