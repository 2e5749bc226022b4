"""Frozen layers run once per example: the trainable top of a BERT-style encoder, and a cache of what feeds it.

When the embeddings and the lowest ``k`` encoder layers are frozen, their output for an example never changes
between epochs. ``build_cache`` computes it once (in eval mode: frozen modules never use dropout, in the cached path
and in the full one alike), stores it as fp16/bf16 rows (in memory up to a size limit, past it in a memory-mapped
temporary file), and ``TailForward`` runs only layers ``k..`` + pooler + head on those rows each epoch, with the
same extended attention mask the full model builds. The pooler reads the last layer's first (CLS) state and nothing
else, so ``TailForward`` computes that layer at the CLS position only (``cls_only_layer``: its keys and values still
see every token; the same function at about a sixth of the layer's work). ``tail_agreement`` checks, on real inputs,
that the split model gives the logits of the whole model before the cache is trusted.

Supported: ``*ForSequenceClassification`` models whose base has ``embeddings``, ``encoder.layer`` of BERT layers
(``bert_layer``) and a pooler, and whose head is ``dropout`` + ``classifier`` on the pooled output (BERT, MiniLM,
multilingual-e5 converted to BERT, with or without ``token_type_ids``). Anything else trains through ``FullForward``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fluent_reward.errors import FluentRewardError
from fluent_reward.model import collate

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NUMPY_STORAGE = {torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float32: np.float32}
FP16_MAX = 65504.0


def frozen_modules(model: Any, embeddings: bool, layers: int) -> list[nn.Module]:
    """The embeddings and/or the lowest ``layers`` encoder layers (errors name the setting to change)."""
    base = model.base_model
    modules = [base.embeddings] if embeddings else []
    if layers:
        stack = getattr(getattr(base, "encoder", None), "layer", None)
        if stack is None:
            raise FluentRewardError(
                f"train.freeze_layers={layers}: this backbone has no `encoder.layer` stack; set it to 0"
            )
        if layers > len(stack):
            raise FluentRewardError(f"train.freeze_layers={layers}: the backbone has only {len(stack)} layers")
        modules += list(stack[:layers])
    return modules


def supports_tail(model: Any) -> bool:
    """Whether ``TailForward`` knows this architecture (its agreement is still checked on real inputs)."""
    base = getattr(model, "base_model", None)
    return (
        type(model).__name__.endswith("ForSequenceClassification")
        and base is not None
        and hasattr(base, "embeddings")
        and isinstance(getattr(getattr(base, "encoder", None), "layer", None), nn.ModuleList)
        and getattr(base, "pooler", None) is not None
        and isinstance(getattr(model, "classifier", None), nn.Linear)
        and isinstance(getattr(model, "dropout", None), nn.Dropout)
        and not getattr(model.config, "is_decoder", False)
        and all(bert_layer(layer) for layer in base.encoder.layer)
    )


def bert_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` has the parts ``cls_only_layer`` runs (a BERT layer: query / key / value, attention output,
    intermediate, output)."""
    attention = getattr(getattr(layer, "attention", None), "self", None)
    return (
        all(isinstance(getattr(attention, name, None), nn.Linear) for name in ("query", "key", "value"))
        and isinstance(getattr(attention, "dropout", None), nn.Dropout)
        and all(hasattr(attention, name) for name in ("num_attention_heads", "attention_head_size"))
        and all(hasattr(layer, name) for name in ("intermediate", "output"))
        and hasattr(layer.attention, "output")
    )


class _KeepFrozenInEval(nn.Module):
    """``train()`` leaves the frozen modules in eval mode: no dropout where nothing learns, in both paths."""

    frozen: list[nn.Module]

    def train(self, mode: bool = True) -> _KeepFrozenInEval:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self


class FullForward(_KeepFrozenInEval):
    """The whole model on token ids: ``forward(input_ids, attention_mask, [token_type_ids]) -> logits``."""

    def __init__(self, model: Any, frozen: Sequence[nn.Module]):
        super().__init__()
        self.model = model
        self.frozen = list(frozen)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


class TailForward(_KeepFrozenInEval):
    """Layers ``start..`` + pooler + dropout + classifier on cached hidden states: ``forward(hidden_states,
    attention_mask) -> logits``. Holds the whole model, so DDP and the optimizer see the same parameters."""

    def __init__(self, model: Any, start: int, frozen: Sequence[nn.Module]):
        super().__init__()
        self.model = model
        self.start = start
        self.frozen = list(frozen)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        base = self.model.base_model
        layers = base.encoder.layer[self.start :]
        hidden = hidden_states
        if len(layers):
            hidden = run_layers(base.config, layers[:-1], hidden, attention_mask)
            hidden = cls_only_layer(layers[-1], hidden, attention_mask)
        return self.model.classifier(self.model.dropout(base.pooler(hidden)))


def cls_only_layer(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A BERT layer's output at the first (CLS) position only, shape (batch, 1, hidden): the queries, the attention
    output and the feed-forward block run for one token, the keys and values for every token (``attention_mask``:
    (batch, tokens), 1 = a real token). The same as the whole layer's first row, at about a sixth of its work."""
    attention = layer.attention.self
    batch, width = hidden.shape[0], hidden.shape[-1]
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, heads, size).transpose(1, 2)

    query = split_heads(attention.query(hidden[:, :1]))
    key, value = split_heads(attention.key(hidden)), split_heads(attention.value(hidden))
    context = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask.bool()[:, None, None, :],
        dropout_p=attention.dropout.p if attention.training else 0.0,
    )
    attended = layer.attention.output(context.transpose(1, 2).reshape(batch, 1, width), hidden[:, :1])
    return layer.output(layer.intermediate(attended), attended)


def run_layers(config: Any, layers: Sequence[nn.Module], hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """Encoder layers on hidden states, with the extended (4-D or None) mask the base model of ``config`` would
    build."""
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    for layer in layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def prefix_hidden(model: Any, start: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output of the embeddings and of layers ``0..start-1`` (the frozen part) for a collated batch."""
    base = model.base_model
    hidden = base.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    return run_layers(base.config, base.encoder.layer[:start], hidden, batch["attention_mask"])


def pooled_prefix(model: Any, layers: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over each row's tokens (attention mask) of the hidden states after encoder layer ``layers``
    (0: the embeddings' output), fp32: the n-gram head's embedding of a reply (``fluent_reward.ngram``)."""
    hidden = prefix_hidden(model, layers, batch).float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class PooledPrefix(nn.Module):
    """``pooled_prefix`` as a module with positional tensor inputs in ``names`` order (the ONNX export's graph)."""

    def __init__(self, model: Any, layers: int, names: Sequence[str]):
        super().__init__()
        self.model, self.layers, self.names = model, layers, list(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return pooled_prefix(self.model, self.layers, dict(zip(self.names, tensors, strict=True)))


def tail_agreement(model: Any, start: int, encoded: Sequence[dict[str, list[int]]], pad: int) -> float:
    """Largest |logit difference| between the whole model and prefix + tail, in eval mode and fp32, on ``encoded``."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batch = collate(encoded, pad)
            full = model(**batch).logits
            split = TailForward(model, start, []).eval()(prefix_hidden(model, start, batch), batch["attention_mask"])
            return float((full - split).abs().max())
    finally:
        model.train(was_training)


class FeatureCache:
    """Hidden states after the frozen prefix, one block of rows per example, in ``dtype``.

    In memory up to ``max_bytes``; past it, in a memory-mapped file in the system temporary folder (``TMPDIR``),
    removed by ``close()``.
    """

    def __init__(self, lengths: Sequence[int], hidden_size: int, dtype: torch.dtype, max_bytes: int):
        self.lengths = list(lengths)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        n_tokens = int(self.offsets[-1])
        self.nbytes = n_tokens * hidden_size * torch.empty((), dtype=dtype).element_size()
        self.path: Path | None = None
        if self.nbytes <= max_bytes:
            self.rows = torch.empty((n_tokens, hidden_size), dtype=dtype)
        else:
            handle, name = tempfile.mkstemp(prefix="fluent-reward-prefix-", suffix=".bin")
            os.close(handle)
            self.path = Path(name)
            storage = np.memmap(self.path, dtype=_NUMPY_STORAGE[dtype], mode="w+", shape=(n_tokens, hidden_size))
            self.rows = torch.from_numpy(storage).view(dtype)

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def put(self, index: int, hidden: torch.Tensor) -> None:
        if self.rows.dtype == torch.float16 and float(hidden.abs().max()) > FP16_MAX:
            raise FluentRewardError(
                "train.frozen_cache_dtype=float16: a frozen layer's output exceeds the float16 range; "
                "set it to bfloat16 or float32"
            )
        start = int(self.offsets[index])
        self.rows[start : start + self.lengths[index]] = hidden.to(self.rows.dtype)

    def batch(self, indices: Sequence[int], device: Any) -> dict[str, torch.Tensor]:
        """Padded fp32 hidden states (B, longest, H) and the attention mask (B, longest) of these examples."""
        width = max(self.lengths[i] for i in indices)
        hidden = torch.zeros((len(indices), width, self.rows.shape[1]), dtype=torch.float32)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            start, n = int(self.offsets[i]), self.lengths[i]
            hidden[row, :n] = self.rows[start : start + n]
            mask[row, :n] = 1
        return {"hidden_states": hidden.to(device), "attention_mask": mask.to(device)}

    def close(self) -> None:
        self.rows = torch.empty(0)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def build_cache(
    model: Any,
    start: int,
    encoded: Sequence[dict[str, list[int]]],
    pad: int,
    batch_size: int,
    dtype: torch.dtype,
    max_bytes: int,
) -> FeatureCache:
    """Run the frozen prefix once over every example (length-sorted batches, eval mode) into a ``FeatureCache``."""
    device = next(model.parameters()).device
    lengths = [len(e["input_ids"]) for e in encoded]
    cache = FeatureCache(lengths, model.config.hidden_size, dtype, max_bytes)
    order = sorted(range(len(encoded)), key=lambda i: lengths[i])
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for first in range(0, len(order), batch_size):
                idx = order[first : first + batch_size]
                batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
                hidden = prefix_hidden(model, start, batch).float().cpu()
                for row, i in enumerate(idx):
                    cache.put(i, hidden[row, : lengths[i]])
    except BaseException:
        cache.close()
        raise
    finally:
        model.train(was_training)
    return cache
