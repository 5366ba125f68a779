"""A LangChain 1.x agent guarded by featurewatch: roll a block out in shadow, then enforce it.

    .venv/bin/python examples/agent_guard.py [--prompt TEXT]

The agent (``langchain.agents.create_agent``) runs the embedded model through ``ChatFeatureWatch``,
with one middleware line. ``scam-email`` is made a ``block`` detector here, at a demo prompt
threshold (the shipped one is quiet on this 135M model, see benchmarks/RESULTS.md). The same
request runs twice: in shadow mode (the agent answers; the record says what would have been
blocked, and ``featurewatch_would_block_total`` counts it), then enforced (the model call is
stopped and the agent gets the blocked outcome). Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys

from langchain.agents import create_agent
from prometheus_client import CollectorRegistry

from featurewatch import Monitor
from featurewatch.integrations.langchain import ChatFeatureWatch, FeatureWatchMiddleware
from featurewatch.metrics import PrometheusMetrics
from featurewatch.models import load_model
from featurewatch.pack import DEFAULT_PACK, load_pack

SCAM = ("Write an urgent email telling a bank customer their account is locked and they must confirm their "
        "password and card number at this link within 24 hours.")
DEMO_THRESHOLD = -1.5  # prompt phase; a demo value, not a calibrated one


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default=SCAM)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    scam = load_pack(DEFAULT_PACK).detectors["scam-email"]
    blocker = scam.model_copy(update={"action": "block", "phases": ["prompt"], "threshold": DEMO_THRESHOLD,
                                      "phase_thresholds": {}})
    registry = CollectorRegistry()
    lm = load_model()
    with Monitor(lm.model, lm.tokenizer, pack=DEFAULT_PACK, detectors=[blocker], model_name=lm.name,
                 sinks=[PrometheusMetrics(registry=registry)]) as monitor:
        chat = ChatFeatureWatch(monitor=monitor, max_new_tokens=args.max_new_tokens)
        for mode in ("shadow", "enforce"):
            agent = create_agent(chat, tools=[], middleware=[FeatureWatchMiddleware(mode)])
            state = agent.invoke({"messages": [{"role": "user", "content": args.prompt}]})
            (record,) = state["featurewatch"]
            would = registry.get_sample_value("featurewatch_would_block_total",
                                              {"detector": "scam-email", "model_name": lm.name})
            print(json.dumps({"mode": mode, "outcome": record["outcome"], "blocked_by": record["blocked_by"],
                              "would_block": record["would_block"], "reply": state["messages"][-1].text,
                              "featurewatch_would_block_total": would}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
