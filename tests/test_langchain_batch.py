"""A LangChain batch in enforce mode: each input gets its own outcome (a tiny Llama, so it runs in seconds).

``HuggingFacePipeline.batch`` runs all its prompts in one ``_generate``: one blocked input used to
fail all of them with the same exception, the inputs after it never ran, and a finished benign
input got the block error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from conftest import make_monitor, tiny_spec
from featurewatch import Monitor
from featurewatch.integrations.langchain import FeatureWatchCallbackHandler
from featurewatch.models import load_model

LONG = ("Dear customer, your account is locked. Confirm your password and card number at this link "
        "within 24 hours or it will be closed for good.")
SHORT = ["Hi.", "Hello.", "Hey.", "Yo.", "Bye.", "Thanks.", "Okay."]


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir: Any, tiny_lm_pack: Any) -> Iterator[tuple[Any, Monitor]]:
    import transformers
    from langchain_huggingface import HuggingFacePipeline

    loaded = load_model(str(tiny_lm_dir))
    # blocks any prompt of 12 content tokens or more, at its prefill; the short prompts never reach 12
    long_prompt = tiny_spec(name="long-prompt", action="block", threshold=-1e6, phases=["prompt"],
                            pooling={"method": "mean", "min_tokens": 12})
    monitor = make_monitor(loaded, pack=tiny_lm_pack, detectors=[long_prompt])
    pipe = transformers.pipeline("text-generation", model=loaded.model, tokenizer=loaded.tokenizer,
                                 max_new_tokens=3, do_sample=False, return_full_text=False)
    yield HuggingFacePipeline(pipeline=pipe), monitor
    monitor.detach()


PROMPTS = [SHORT[0], LONG, *SHORT[1:]]  # eight inputs, the second one blocked


class RunIds(BaseCallbackHandler):
    """The LangChain run id of each prompt (a batch gives its runs ids of its own)."""

    run_inline = True  # in the caller's thread or task, as the featurewatch handler

    def __init__(self) -> None:
        self.by_prompt: dict[str, uuid.UUID] = {}

    def on_llm_start(self, serialized: Any, prompts: list[str], *, run_id: uuid.UUID, **kw: Any) -> None:
        self.by_prompt[prompts[0]] = run_id


def _check(handler: FeatureWatchCallbackHandler, outputs: list[str], runs: RunIds) -> None:
    assert len(outputs) == 8 and all(isinstance(o, str) for o in outputs)  # no exception for anyone
    ids = [runs.by_prompt[p] for p in PROMPTS]
    outcomes = [handler.result(i).outcome if handler.result(i) else None for i in ids]
    assert outcomes == ["completed", "blocked", *["completed"] * 6]  # inputs 3–8 ran, each to its own end
    assert outputs[1] == ""  # nothing of the blocked generation is handed back
    assert [a.run_id for a in handler.alerts if a.action == "block"] == [str(ids[1])]


def test_batch_blocks_per_input_in_enforce_mode(tiny: tuple[Any, Monitor]) -> None:
    llm, monitor = tiny
    handler, runs = FeatureWatchCallbackHandler(monitor, mode="enforce"), RunIds()
    outputs = llm.batch(PROMPTS, config={"callbacks": [handler, runs]})
    _check(handler, outputs, runs)
    assert "generate" not in vars(monitor.model)  # the wrapper is gone when the runs end


def test_abatch_blocks_per_input_in_enforce_mode(tiny: tuple[Any, Monitor]) -> None:
    llm, monitor = tiny
    handler, runs = FeatureWatchCallbackHandler(monitor, mode="enforce"), RunIds()
    outputs = asyncio.run(llm.abatch(PROMPTS, config={"callbacks": [handler, runs]}))
    _check(handler, outputs, runs)


def test_generate_says_why_an_input_came_back_empty(tiny: tuple[Any, Monitor]) -> None:
    llm, monitor = tiny
    handler = FeatureWatchCallbackHandler(monitor, mode="enforce")
    result = llm.generate([SHORT[0], LONG], callbacks=[handler])
    blocked, fine = result.generations[1][0], result.generations[0][0]
    assert blocked.text == "" and blocked.generation_info["featurewatch"]["outcome"] == "blocked"
    assert blocked.generation_info["featurewatch"]["detector"] == "long-prompt"
    assert "featurewatch" not in (fine.generation_info or {})


def test_a_single_blocked_invoke_still_raises(tiny: tuple[Any, Monitor]) -> None:
    from featurewatch import GenerationBlocked

    llm, monitor = tiny
    handler = FeatureWatchCallbackHandler(monitor, mode="enforce")
    with pytest.raises(GenerationBlocked):
        llm.invoke(LONG, config={"callbacks": [handler]})
