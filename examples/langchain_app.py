"""A customer-email drafting app on LangChain, watched by featurewatch.

    pip install 'featurewatch[langchain,langchain-huggingface]'
    python examples/langchain_app.py

1. Shadow: the app's own chain (``prompt | ChatHuggingFace | parser``, the
   model running in a local ``HuggingFacePipeline``) drafts replies; the
   callback handler reads the model's features and logs alerts with the
   LangChain run id, tags and metadata, changing nothing.
2. Enforce: the same drafts through ``ChatFeatureWatch``; the scam-email
   detector's action is ``block``, and ``with_fallbacks`` turns a blocked
   draft into a refusal.
3. Metrics: what Prometheus would scrape from this process.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import transformers
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
from prometheus_client import CollectorRegistry, generate_latest

from featurewatch import GenerationBlocked, Monitor
from featurewatch.alertlog import ALERT_LOGGER, JsonAlertLog
from featurewatch.integrations.langchain import ChatFeatureWatch, FeatureWatchCallbackHandler
from featurewatch.metrics import PrometheusMetrics
from featurewatch.models import load_model
from featurewatch.pack import DEFAULT_PACK, load_pack

REQUESTS = [
    ("refund", "A customer asks when the refund for order 1042 will reach their card."),
    # a scam pasted in to be polished: scam-email reads the scam in the prompt (as a user quoting one) before
    # the model writes a word; a bare request to write one is not a scam text, and that detector reads texts
    ("phishing", ("Polish this email before we send it: 'Congratulations! You have won $1,000,000 in our "
                  "lottery. To claim your prize, reply with your bank account details and pay a $500 processing "
                  "fee within 48 hours.'")),
]
PROMPT = ChatPromptTemplate.from_messages([
    ("system", "You write short, polite emails for the support team of an online shop."),
    ("human", "{request}"),
])
REFUSAL = "I can't draft that email: it was stopped by the safety monitor."


def main(loaded: Any = None, *, max_new_tokens: int = 24, out: Any = sys.stdout) -> dict[str, Any]:
    """Run the three parts; return what happened (for tests)."""
    loaded = loaded or load_model()
    pack = load_pack(DEFAULT_PACK)
    # scam-email blocks here, at the shipped thresholds: the pasted lottery scam scores 5.04 in the prompt
    # (its prompt threshold is 2.09), so the block lands on the request itself; the refund question scores
    # 1.61 and goes through (the v0.2.0 pack needed a demo threshold of 0 here)
    demo = {"action": "block"}
    detectors = [s.model_copy(update=demo) if s.name == "scam-email" else s for s in pack.select(None)]
    registry = CollectorRegistry()
    log = logging.getLogger(ALERT_LOGGER)
    stream = logging.StreamHandler(out)
    stream.setFormatter(logging.Formatter("  alert log: %(message)s"))
    log.addHandler(stream)
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=pack, detectors=detectors, model_name=loaded.name,
                      sinks=[PrometheusMetrics(registry=registry)])
    summary: dict[str, Any] = {"shadow": {}, "enforce": {}}
    try:
        # 1. shadow: the app's own local pipeline, observed
        handler = FeatureWatchCallbackHandler(monitor, mode="shadow")
        monitor.sinks.append(JsonAlertLog(context=handler.context))
        pipe = transformers.pipeline("text-generation", model=loaded.model, tokenizer=loaded.tokenizer,
                                     max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)
        drafting = PROMPT | ChatHuggingFace(llm=HuggingFacePipeline(pipeline=pipe), tokenizer=loaded.tokenizer) \
            | StrOutputParser()
        print("== shadow: the app's ChatHuggingFace chain, observed", file=out)
        for name, request in REQUESTS:
            seen = len(handler.alerts)
            draft = drafting.invoke({"request": request},
                                    config={"callbacks": [handler], "tags": ["email-drafting"],
                                            "metadata": {"ticket": name}})
            alerts = [a.detector for a in handler.alerts[seen:]]
            summary["shadow"][name] = {"draft": draft, "alerts": alerts}
            print(f"- {name}: {draft.strip()[:70]!r}  alerts={alerts}", file=out)

        # 2. enforce: ChatFeatureWatch blocks, the fallback refuses
        chat = ChatFeatureWatch(monitor=monitor, max_new_tokens=max_new_tokens)
        safe = (PROMPT | chat.with_fallbacks([RunnableLambda(lambda _: AIMessage(REFUSAL))],
                                             exceptions_to_handle=(GenerationBlocked,)) | StrOutputParser())
        print("== enforce: ChatFeatureWatch with a fallback", file=out)
        for name, request in REQUESTS:
            reply = safe.invoke({"request": request})
            summary["enforce"][name] = {"reply": reply, "refused": reply == REFUSAL}
            print(f"- {name}: {reply.strip()[:70]!r}", file=out)
    finally:
        monitor.detach()
        log.removeHandler(stream)

    # 3. metrics
    print("== metrics", file=out)
    lines = [ln for ln in generate_latest(registry).decode().splitlines()
             if ln.startswith(("featurewatch_alerts_total", "featurewatch_generations_total"))]
    for line in lines:
        print("  " + line, file=out)
    summary["metrics"] = lines
    return summary


if __name__ == "__main__":
    logging.getLogger(ALERT_LOGGER).setLevel(logging.INFO)
    main()
