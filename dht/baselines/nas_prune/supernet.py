"""The supernet: the teacher's weights (a private copy, trained by the search's weight steps) plus the architecture
variables, the alphas of the masks and of the head weights (report Sections 5.4-5.5)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from dht.baselines.nas_prune.arch import PrunedArch, teacher_fields
from dht.baselines.nas_prune.cost import Convention, head_flops
from dht.baselines.nas_prune.masks import additive_mask, masked_layer_norm, mean_pool, rescaled_sigmoid
from dht.model import DHTForSequenceClassification

ALPHA_INIT = 5.0  # Section 5.5.1: "initialize alpha to a constant value 5, since sigmoid(5) ~ 1"
HEAD_ALPHA_STD = 0.01  # Section 5.5.2: "initialize alpha from Normal(0, 0.01)" (read as standard deviation)


class Supernet(nn.Module):
    """The teacher's weights (a private copy, trained by the weight steps) plus the architecture variables.

    ``forward`` is a BERT forward written here (``dht/model.py`` is untouched) in which

    * Q and K outputs are multiplied by ``m_qk[l]``, V outputs by ``m_v[l]`` (per dimension of the all-heads
      width d; h_q = h_k, Section 5.4.2);
    * every head's context is multiplied by its DARTS weight ``N_H * softmax(alpha_heads[l])_h`` (equation (5),
      rescaled by N_H so that the uniform initial weights are 1 and the supernet starts as the teacher);
    * the FFN activations are multiplied by ``m_ffn[l]`` (Section 5.4.3);
    * the embedding output and every residual LayerNorm are masked LayerNorms with ``m_e`` (Section 5.4.1); with a
      pre-LN teacher they normalise the sub-layer inputs, the two branch outputs are multiplied by ``m_e`` before
      the residual add, and the final LayerNorm before the pooler is masked too (see the docstring of
      :mod:`dht.baselines.nas_prune`);
    * with ``classifier_pooling="mean"`` the classifier reads the mean over the real tokens of the last
      (gated) stream instead of the pooler's output on [CLS].

    ``gates`` may replace the masks by hard 0/1 gates of an architecture (:meth:`hard_gates`).
    """

    def __init__(self, teacher: DHTForSequenceClassification, alpha_init: float = ALPHA_INIT,
                 head_alpha_std: float = HEAD_ALPHA_STD, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.net = copy.deepcopy(teacher)
        self.net.train()
        c = teacher.config
        self.d, self.n_layers, self.n_heads, self.ffn = (c.hidden_size, c.num_hidden_layers,
                                                          c.num_attention_heads, c.intermediate_size)
        self.head_size = self.d // self.n_heads
        self.num_labels = c.num_labels
        self.pre_ln = c.layer_norm == "pre"
        self.pooling = c.classifier_pooling
        device = next(teacher.parameters()).device
        self.alpha_embed = nn.Parameter(torch.full((self.d,), alpha_init, device=device))
        self.alpha_qk = nn.Parameter(torch.full((self.n_layers, self.d), alpha_init, device=device))
        self.alpha_v = nn.Parameter(torch.full((self.n_layers, self.d), alpha_init, device=device))
        self.alpha_ffn = nn.Parameter(torch.full((self.n_layers, self.ffn), alpha_init, device=device))
        heads = torch.randn(self.n_layers, self.n_heads, generator=generator) * head_alpha_std
        self.alpha_heads = nn.Parameter(heads.to(device))
        self.fields = teacher_fields(teacher)  # what derive_arch needs

    # ---- parameters ------------------------------------------------------------------------------------------

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_embed, self.alpha_qk, self.alpha_v, self.alpha_ffn, self.alpha_heads]

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def alphas(self) -> dict[str, Tensor]:
        return {
            "embed": self.alpha_embed.detach().cpu().clone(),
            "qk": self.alpha_qk.detach().cpu().clone(),
            "v": self.alpha_v.detach().cpu().clone(),
            "ffn": self.alpha_ffn.detach().cpu().clone(),
            "heads": self.alpha_heads.detach().cpu().clone(),
        }

    def soft_gates(self) -> dict[str, Tensor]:
        """Masks sigmoid(alpha) (with the rescaled gradient) and the head weights N_H * softmax (equation (5))."""
        return {
            "embed": rescaled_sigmoid(self.alpha_embed),
            "qk": rescaled_sigmoid(self.alpha_qk),
            "v": rescaled_sigmoid(self.alpha_v),
            "ffn": rescaled_sigmoid(self.alpha_ffn),
            "heads": self.n_heads * torch.softmax(self.alpha_heads, dim=-1),
        }

    def hard_gates(self, arch: PrunedArch) -> dict[str, Tensor]:
        """0/1 gates equivalent to ``arch`` (kept heads get weight 1, pruned heads 0)."""
        device = self.alpha_embed.device
        embed = torch.zeros(self.d, device=device)
        embed[arch.embed_dims] = 1.0
        qk = torch.zeros(self.n_layers, self.d, device=device)
        v = torch.zeros(self.n_layers, self.d, device=device)
        ffn = torch.zeros(self.n_layers, self.ffn, device=device)
        heads = torch.zeros(self.n_layers, self.n_heads, device=device)
        for i, layer in enumerate(arch.layers):
            for h, qd, vd in zip(layer.heads, layer.qk_dims, layer.v_dims, strict=True):
                heads[i, h] = 1.0
                qk[i, [h * self.head_size + j for j in qd]] = 1.0
                v[i, [h * self.head_size + j for j in vd]] = 1.0
            ffn[i, layer.ffn_dims] = 1.0
        return {"embed": embed, "qk": qk, "v": v, "ffn": ffn, "heads": heads}

    # ---- forward ---------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                gates: dict[str, Tensor] | None = None, dropout: bool = False) -> Tensor:
        """Logits of the masked supernet. ``dropout``: apply the teacher's dropout rates (training steps)."""
        g = self.soft_gates() if gates is None else gates
        bert, c = self.net.bert, self.net.config
        p_hidden = c.hidden_dropout_prob if dropout else 0.0
        p_attn = c.attention_probs_dropout_prob if dropout else 0.0
        m_e = g["embed"]
        emb = bert.embeddings
        n = input_ids.shape[1]
        x = (emb.word_embeddings(input_ids) + emb.token_type_embeddings(torch.zeros_like(input_ids))
             + emb.position_embeddings(torch.arange(n, device=input_ids.device))[None])
        x = F.dropout(masked_layer_norm(x, emb.LayerNorm, m_e), p_hidden)
        add_mask = additive_mask(attention_mask, x.dtype)
        batch, heads, dh = x.shape[0], self.n_heads, self.head_size
        scale = 1.0 / math.sqrt(dh)
        act = ACT2FN[c.hidden_act]
        for i, layer in enumerate(bert.encoder.layer):
            sa, out = layer.attention.self, layer.attention.output
            # Pre-LN: the attention reads the masked LayerNorm of the stream (zero outside the kept dimensions).
            h = masked_layer_norm(x, out.LayerNorm, m_e) if self.pre_ln else x

            def split(t: Tensor) -> Tensor:
                return t.view(batch, n, heads, dh).transpose(1, 2)

            q = split(sa.query(h) * g["qk"][i])
            k = split(sa.key(h) * g["qk"][i])
            v = split(sa.value(h) * g["v"][i])
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            if add_mask is not None:
                scores = scores + add_mask
            probs = F.dropout(torch.softmax(scores, dim=-1), p_attn)
            context = torch.matmul(probs, v) * g["heads"][i][None, :, None, None]
            context = context.transpose(1, 2).reshape(batch, n, heads * dh)
            attn = F.dropout(out.dense(context), p_hidden)
            if self.pre_ln:
                # No LayerNorm follows the add, so the branch itself is masked: the output projection's rows
                # (and bias) outside the kept dimensions would otherwise refill the pruned part of the stream. With
                # 0/1 gates the logits would not change (every read of the stream is a masked LayerNorm, blind to
                # those dimensions), but the stream would no longer be the extracted model's padded with zeros,
                # and with soft masks a dimension's m_e would not scale what the branches write into it.
                x = x + attn * m_e
                h = masked_layer_norm(x, layer.output.LayerNorm, m_e)
            else:
                x = h = masked_layer_norm(attn + x, out.LayerNorm, m_e)
            inter = act(layer.intermediate.dense(h)) * g["ffn"][i]
            ffn = F.dropout(layer.output.dense(inter), p_hidden)
            x = x + ffn * m_e if self.pre_ln else masked_layer_norm(ffn + x, layer.output.LayerNorm, m_e)
        if self.pre_ln:
            x = masked_layer_norm(x, bert.final_layer_norm, m_e)  # DHTBertModel.final_norm, masked
        if self.pooling == "mean":
            pooled = mean_pool(x, attention_mask)  # zero outside the kept dimensions, like the stream
        else:
            pooled = bert.pooler.activation(bert.pooler.dense(x[:, 0]))
        p_cls = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        return self.net.classifier(F.dropout(pooled, p_cls if dropout else 0.0))

    # ---- cost ------------------------------------------------------------------------------------------------

    def expected_flops(self, seq_len: int, convention: Convention = "full",
                       gates: dict[str, Tensor] | None = None) -> Tensor:
        """E_cost(A) of equation (4): the FLOPs formula of :func:`pruned_flops` with every width replaced by the
        sum of its soft mask (the expected width when each dimension is kept with probability m_i). The bilinear
        terms (d_e x q, d_e x v, d_e x f) are then exact expectations for independent keep decisions. The head
        weights do not enter: softmax weights sum to a constant, so equation (5) carries no cost."""
        g = self.soft_gates() if gates is None else gates
        n = seq_len
        de = g["embed"].sum()
        q, v, f = g["qk"].sum(-1), g["v"].sum(-1), g["ffn"].sum(-1)  # [L]
        per_layer = 2 * n * de * (2 * q + v) + 2 * n * v * de + 4 * n * de * f
        if convention == "full":
            per_layer = per_layer + 2 * n * n * (q + v)
        return per_layer.sum() + head_flops(de, self.d, self.num_labels, self.pooling)

    def sampled_gates(self, generator: torch.Generator) -> dict[str, Tensor]:
        """A binary architecture sampled from the masks (dimension i kept with probability m_i, independently),
        with a straight-through gradient: the value is the 0/1 sample, the gradient reaches m (and, through the
        rescaled sigmoid, alpha) unchanged. Head weights stay the continuous equation (5)."""
        gates = self.soft_gates()
        out = {"heads": gates["heads"]}
        for key in ("embed", "qk", "v", "ffn"):
            m = gates[key]
            u = torch.rand(m.shape, generator=generator).to(m.device)
            out[key] = (u < m.detach()).to(m.dtype) + m - m.detach()
        return out
