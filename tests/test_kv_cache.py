"""The buffered KV cache gives what transformers' own layers give, without a copy per step."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from phisum.backends.kv_cache import BufferedLayer, BufferedSlidingLayer


def states(rows, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, tokens, 4, generator=generator), torch.randn(rows, 2, tokens, 4, generator=generator)


@pytest.mark.parametrize("window", [None, 7])
def test_buffered_layers_return_what_dynamic_layers_return_step_by_step(window):
    ours = BufferedLayer() if window is None else BufferedSlidingLayer(sliding_window=window)
    theirs = DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window)
    steps = [states(3, 4, 0)] + [states(3, 1, seed) for seed in range(1, 9)]
    for step, (key, value) in enumerate(steps):
        if step == 5:  # a row leaves the batch mid-way, as the backend's leave-early does
            for layer in (ours, theirs):
                layer.batch_select_indices(torch.tensor([0, 2]))
        if step >= 5:
            key, value = key[[0, 2]], value[[0, 2]]
        got, want = ours.update(key, value), theirs.update(key, value)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), step
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)


def test_appending_writes_into_the_buffer_until_its_room_is_used():
    layer = BufferedLayer()
    key, value = states(2, 5, 0)
    layer.lazy_initialization(key, value)
    layer.hold(key, value, room=3)
    start = layer.keys.data_ptr()
    for seed in range(3):
        layer.update(*states(2, 1, seed + 1))
        assert layer.keys.data_ptr() == start  # no copy of the cache
    assert layer.keys.shape[-2] == 8 and torch.equal(layer.keys[..., :5, :], key)
    layer.update(*states(2, 1, 9))  # past the room: one copy into a bigger buffer, values kept
    assert layer.keys.data_ptr() != start and layer.keys.shape[-2] == 9 and torch.equal(layer.keys[..., :5, :], key)
    layer.crop(-2)  # crop, then append over the dropped positions
    new_key, new_value = states(2, 1, 10)
    keys, values = layer.update(new_key, new_value)
    assert keys.shape[-2] == 8 and torch.equal(keys[..., -1:, :], new_key) and torch.equal(values[..., :5, :], value)


def test_rows_of_different_lengths_are_left_padded_with_zeros():
    layer = BufferedLayer()
    (long_key, long_value), (short_key, short_value) = states(1, 5, 0), states(1, 2, 1)
    layer.lazy_initialization(long_key, long_value)
    layer.hold_rows([long_key[0], short_key[0]], [long_value[0], short_value[0]], room=4)
    assert layer.keys.shape == (2, 2, 5, 4)
    assert torch.equal(layer.keys[1, :, 3:], short_key[0]) and not layer.keys[1, :, :3].any()
    assert torch.equal(layer.values[0], long_value[0])
