"""positions: which tokens each Hugging Face forward pass adds, flat, and which of them detectors read."""

from __future__ import annotations

import torch

from featurewatch.positions import PositionTracker, excluded_positions

SPECIAL = [0, 1]  # pad, eos (as the tiny tokenizer)


def test_prefill_then_one_position_per_cached_decode_step() -> None:
    tracker = PositionTracker(2, SPECIAL)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    prefill = tracker.step(ids, None, 3)
    assert prefill.counts == (3, 3)
    assert prefill.run.tolist() == [0, 0, 0, 1, 1, 1]
    assert prefill.position.tolist() == [0, 1, 2, 0, 1, 2]
    assert prefill.token_id.tolist() == [5, 6, 7, 8, 9, 10]
    assert not prefill.completion.any()  # the whole first call is prompt by default
    assert prefill.read.tolist() == [False, True, True, False, True, True]  # each row's sink is not read
    decode = tracker.step(torch.tensor([[11], [12]]), None, 4)
    assert decode.counts == (1, 1)
    assert decode.position.tolist() == [3, 3]
    assert decode.completion.all() and decode.read.all()
    assert tracker.n_seen == 4


def test_without_the_cache_only_the_tail_is_new() -> None:
    tracker = PositionTracker(1, SPECIAL)
    tracker.step(torch.tensor([[5, 6, 7]]), None, 3)
    again = tracker.step(torch.tensor([[5, 6, 7, 8]]), None, 4)  # the whole sequence again
    assert again.position.tolist() == [3] and again.token_id.tolist() == [8]


def test_left_padding_moves_the_sink_and_pads_are_neither_read_nor_steered() -> None:
    tracker = PositionTracker(2, SPECIAL)
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    step = tracker.step(ids, mask, 4)
    assert step.read.view(2, 4).tolist() == [[False, False, False, True], [False, True, True, True]]
    assert step.steerable.view(2, 4).tolist() == step.read.view(2, 4).tolist()  # no content mask given
    assert excluded_positions(ids, mask, SPECIAL).tolist() == (~step.read.view(2, 4)).tolist()


def test_the_content_mask_hides_markup_from_detectors_but_not_from_steering() -> None:
    tracker = PositionTracker(1, SPECIAL, content=[[False, False, True, True, False]])
    step = tracker.step(torch.tensor([[5, 6, 7, 8, 9]]), None, 5)
    assert step.read.tolist() == [False, False, True, True, False]
    assert step.steerable.tolist() == [False, True, True, True, True]  # only the sink is never steered
    assert tracker.step(torch.tensor([[10]]), None, 6).read.tolist() == [True]  # past the mask: content


def test_n_prompt_splits_one_call_into_prompt_and_completion() -> None:
    tracker = PositionTracker(2, SPECIAL, n_prompt=[2, 3])
    step = tracker.step(torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]]), None, 4)
    assert step.completion.view(2, 4).tolist() == [[False, False, True, True], [False, False, False, True]]


def test_special_tokens_and_embeddings_inputs() -> None:
    tracker = PositionTracker(1, SPECIAL)
    step = tracker.step(torch.tensor([[5, 6, 1, 7]]), None, 4)
    assert step.read.tolist() == [False, True, False, True]  # the sink, and eos
    embedded = PositionTracker(1, SPECIAL).step(None, None, 3)  # inputs_embeds: no ids
    assert embedded.token_id.tolist() == [-1, -1, -1] and embedded.read.tolist() == [False, True, True]
