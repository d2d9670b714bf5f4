"""A KV cache that decodes a batch without copying every row's cache at every step.

transformers' DynamicLayer appends a step's keys and values with torch.cat, which copies the
whole cache each step: a cost that grows with rows x context, so a 16-row batch pays it many
times over where a 1-2 row click barely notices. These layers keep the keys and values in
buffers with room for the tokens still to come, write each step's into place and hand the model
a view of the filled part: the same values in the same shapes, so the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


class _Buffered:
    """Keys/values as views of buffers with `room` free positions after the filled ones.

    Anything else that replaces `self.keys` (crop, reset, the parent's own update) leaves the
    views behind; the next append sees that and copies into fresh buffers once."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        # empty in the states' own shape (transformers starts from a 1-d tensor): appends need no special case
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]

    def hold(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        self.hold_rows(keys.unbind(0), values.unbind(0), room)

    def hold_rows(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], room: int) -> None:
        """Rows of (heads, tokens, dim) of different lengths, left-padded with zeros (masked out,
        as `TransformersBackend._pad` pads their tokens) into one batch."""
        width = max(k.shape[-2] for k in keys)
        k = keys[0].new_zeros(len(keys), *keys[0].shape[:-2], width + room, keys[0].shape[-1])
        v = values[0].new_zeros(len(values), *values[0].shape[:-2], width + room, values[0].shape[-1])
        for row, (key, value) in enumerate(zip(keys, values)):
            k[row, ..., width - key.shape[-2]:width, :], v[row, ..., width - value.shape[-2]:width, :] = key, value
        self._set(k, v, width)

    def _set(self, k, v, filled):
        self._buffers = (k, v)
        self.keys, self.values = k[..., :filled, :], v[..., :filled, :]

    def _current(self) -> bool:
        return self._buffers is not None and self.keys.data_ptr() == self._buffers[0].data_ptr() \
            and self.keys.shape[:-2] == self._buffers[0].shape[:-2]

    def _append(self, key_states, value_states):
        filled, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._current() or filled + new > self._buffers[0].shape[-2]:
            self.hold(self.keys, self.values, max(new, filled // 2, 16))
        k, v = self._buffers
        k[..., filled:filled + new, :], v[..., filled:filled + new, :] = key_states, value_states
        self._set(k, v, filled + new)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._current():  # keep the room: a batch that drops finished rows goes on decoding
            filled = self.keys.shape[-2]
            self._set(self._buffers[0][indices], self._buffers[1][indices], filled)
        else:
            super().batch_select_indices(indices)


class BufferedLayer(_Buffered, DynamicLayer):
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append(key_states, value_states)


class BufferedSlidingLayer(_Buffered, DynamicSlidingWindowLayer):
    """Buffered until the window is full; from then on (or when recording the past) the parent's
    update, which keeps only the window's last keys."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.record_past or self.keys.shape[-2] + key_states.shape[-2] > self.sliding_window - 1:
            return super().update(key_states, value_states, *args, **kwargs)
        self.cumulative_length += key_states.shape[-2]
        return self._append(key_states, value_states)


def buffered_cache(config) -> DynamicCache | None:
    """An empty cache for `config` with buffered layers; None for models whose cache has other
    kinds of layers (static, quantized, linear attention), which keep transformers' own."""
    cache = DynamicCache(config=config)
    kinds = {DynamicLayer: BufferedLayer, DynamicSlidingWindowLayer: BufferedSlidingLayer}
    if not all(type(layer) in kinds for layer in cache.layers):
        return None
    cache.layers = [BufferedSlidingLayer(sliding_window=layer.sliding_window) if layer.is_sliding
                    else BufferedLayer() for layer in cache.layers]
    return cache


def as_dynamic(cache: DynamicCache) -> DynamicCache:
    """The same cache in transformers' own layers (copies per step), to measure against."""
    for index, layer in enumerate(cache.layers):
        plain = DynamicSlidingWindowLayer(sliding_window=layer.sliding_window) if layer.is_sliding else DynamicLayer()
        plain.lazy_initialization(layer.keys, layer.values)
        plain.keys, plain.values = layer.keys.contiguous(), layer.values.contiguous()
        if layer.is_sliding:
            plain.cumulative_length = layer.cumulative_length
        cache.layers[index] = plain
    return cache
