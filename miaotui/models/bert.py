"""A BERT encoder in plain torch that loads Hugging Face BERT safetensors by their own key names.

Written here rather than taken from transformers because the exported graph is the product: plain
MatMul / Softmax / LayerNormalization / Gelu ops in a fixed, readable structure that the quantize
stage can target by name, with no attention-kernel dispatch (sdpa, flash) that changes between
transformers releases, and an additive mask of -10000 rather than float32's minimum, which would
overflow once the graph is converted to FP16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

MASK_BIAS = -10000.0


@dataclass(frozen=True)
class BertShape:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0  # BERT's hidden and attention dropout; training only, gone in eval/export


class BertEmbeddings(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.word_embeddings = nn.Embedding(shape.vocab_size, shape.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(shape.max_positions, shape.hidden_size)
        self.token_type_embeddings = nn.Embedding(shape.type_vocab_size, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single-segment inputs: token type 0 everywhere, so its embedding is one row.
        embedded = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(embedded))


class SelfAttention(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.num_heads = shape.num_heads
        self.head_size = shape.hidden_size // shape.num_heads
        self.query = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.key = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.value = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.dropout = nn.Dropout(shape.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + mask_bias
        context = torch.matmul(self.dropout(scores.softmax(dim=-1)), v)
        batch, _, seq, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_size)


class DenseResidual(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm, as BERT's `output` blocks name them."""

    def __init__(self, inner: int, shape: BertShape):
        super().__init__()
        self.dense = nn.Linear(inner, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.self = SelfAttention(shape)
        self.output = DenseResidual(shape.hidden_size, shape)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, mask_bias), hidden)


class Intermediate(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.dense = nn.Linear(shape.hidden_size, shape.intermediate_size)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.attention = Attention(shape)
        self.intermediate = Intermediate(shape)
        self.output = DenseResidual(shape.intermediate_size, shape)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, mask_bias)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(shape) for _ in range(shape.num_layers))

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, mask_bias)
        return hidden


class BertClassifier(nn.Module):
    """BERT encoder -> mean over the attention mask -> Linear to the classes."""

    def __init__(self, shape: BertShape, num_classes: int):
        super().__init__()
        self.embeddings = BertEmbeddings(shape)
        self.encoder = Encoder(shape)
        self.dropout = nn.Dropout(shape.dropout)
        self.classifier = nn.Linear(shape.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        mask_bias = (1.0 - mask)[:, None, None, :] * MASK_BIAS
        hidden = self.encoder(self.embeddings(input_ids), mask_bias)
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))
