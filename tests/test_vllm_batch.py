"""The vLLM batch mapping without vLLM: flat rows → StepTokens, and the content mask from token ids."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from featurewatch.integrations.vllm.batch import Scheduled, step_tokens
from featurewatch.markup import ChatMarkup

SPECIAL = torch.tensor([0, 1, 2])


def test_mixed_prefill_and_decode_rows_map_to_runs_positions_and_phases() -> None:
    # request A decodes its 6th token (position 5, prompt of 5); request B prefills a 4-token prompt
    positions = torch.tensor([5, 0, 1, 2, 3, 99])  # the last row is padding past query_start_loc[-1]
    ids = torch.tensor([40, 1, 41, 42, 43, 0])
    scheduled = [Scheduled(run=0, start=0, stop=1, n_prompt=5, content=None),
                 Scheduled(run=1, start=1, stop=5, n_prompt=4, content=[False, True, True, False])]
    t = step_tokens(scheduled, positions, ids, SPECIAL)
    assert t.run.tolist() == [0, 1, 1, 1, 1]
    assert t.position.tolist() == [5, 0, 1, 2, 3]
    assert t.completion.tolist() == [True, False, False, False, False]
    # B: position 0 is the sink (and special), 3 is outside the content mask; A's decode token is read
    assert t.read.tolist() == [True, False, True, True, False]
    assert t.steerable.tolist() == [True, False, True, True, True]
    assert t.token_id.tolist() == [40, 1, 41, 42, 43]


def test_a_request_skipped_in_the_middle_keeps_the_rows_of_the_others() -> None:
    positions = torch.tensor([7, 3, 4])
    scheduled = [Scheduled(run=0, start=1, stop=3, n_prompt=2, content=None)]  # row 0 is unmonitored
    t = step_tokens(scheduled, positions, torch.tensor([50, 51, 52]), SPECIAL)
    assert t.position.tolist() == [3, 4] and t.token_id.tolist() == [51, 52]
    assert t.completion.tolist() == [True, True]


def test_no_rows_is_an_empty_step() -> None:
    assert len(step_tokens([], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), SPECIAL)) == 0


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from featurewatch.models import load_tokenizer

    return load_tokenizer()


@pytest.mark.slow
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Write an urgent email telling a bank customer their account is locked."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there,\n\nhow are you?  "}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two words"},
     {"role": "user", "content": "three $5 ok"}],
])
def test_content_mask_from_ids_equals_render_chat(messages: list[dict[str, str]], tokenizer: Any) -> None:
    from featurewatch.records import render_chat, render_text

    masker = ChatMarkup(tokenizer)
    rendered = render_chat(messages, tokenizer)
    assert masker.mask(rendered.ids) == rendered.content
    document = render_text("Dear customer, your account is locked.", tokenizer)
    assert masker.mask(document.ids) == document.content
