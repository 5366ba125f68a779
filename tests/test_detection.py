"""Detection: per-(run, phase) feature sums, pooling and firing per pass, end-of-run verdicts, alerts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import HP, TinyTokenizer, tiny_spec
from featurewatch.detection import Firing, _add_totals, evidence, final_firings, new_pools, observe, record_alert
from featurewatch.detector import DetectorSpec, FeatureWeight
from featurewatch.positions import StepTokens
from featurewatch.state import FeatureTotals, RunState


@pytest.mark.parametrize("counts", [(1,), (1, 1, 1), (7, 7), (64,) * 8, (3, 5, 2)])
def test_feature_totals_equal_index_add_bit_for_bit(counts: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    n, b, m = sum(counts), len(counts), 33
    run = torch.cat([torch.full((c,), r) for r, c in enumerate(counts)])
    completion = torch.cat([torch.arange(c) >= c // 2 for c in counts])
    read = torch.rand(n) > 0.3
    feats = torch.relu(torch.randn(n, m)) * 1000
    tokens = StepTokens(run, torch.arange(n), completion, read, read, torch.zeros(n, dtype=torch.long), counts)
    totals = FeatureTotals(torch.rand(2 * b, m), torch.zeros(2 * b, dtype=torch.long))
    group = run[read] * 2 + completion[read].long()  # the reference: one index_add_ per pass
    expected = totals.sums + torch.zeros(2 * b, m).index_add_(0, group, feats[read])
    _add_totals(totals, tokens, feats, read.tolist(), completion.tolist())
    assert torch.equal(totals.sums, expected)
    assert torch.equal(totals.counts, torch.bincount(group, minlength=2 * b))


# ---------------------------------------------------------------- observe → firings → verdicts and alerts


def _readout(*specs: DetectorSpec) -> Any:
    """What detection reads of a readout: its hookpoint, watched features (3 and 5) and detectors."""
    return SimpleNamespace(hookpoint=HP, feature_ids=[3, 5], detectors=list(specs))


def _runs(n: int, *specs: DetectorSpec) -> list[RunState]:
    runs = [RunState(f"run-{r}", 0.0) for r in range(n)]
    for run in runs:
        new_pools(run, specs)
        for phase in ("prompt", "completion"):
            run.feature_sums[(HP, phase)] = torch.zeros(2)
            run.feature_counts[(HP, phase)] = torch.zeros((), dtype=torch.long)
    return runs


def _step(counts: tuple[int, ...], read: list[bool], completion: list[bool], start: int = 0) -> StepTokens:
    run = torch.cat([torch.full((c,), r) for r, c in enumerate(counts)])
    position = torch.cat([torch.arange(start, start + c) for c in counts])
    return StepTokens(run, position, torch.tensor(completion), torch.tensor(read), torch.tensor(read),
                      torch.arange(len(read)) + 3, counts)


def test_observe_pools_the_read_tokens_of_each_phase_and_fires_once_per_pass() -> None:
    spec = tiny_spec(threshold=1.0)
    runs = _runs(2, spec)
    runs[1].blocked = True  # a blocked run is judged no more
    tokens = _step((3, 3), read=[False, True, True] * 2, completion=[False] * 6)
    feats = torch.tensor([[9.0, 9.0], [1.0, 2.0], [3.0, 4.0]] * 2)
    scores = torch.tensor([[100.0], [2.0], [4.0]] * 2)  # the unread sink scores 100: never pooled
    totals = FeatureTotals(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    firings = observe(_readout(spec), runs, tokens, feats, scores, totals)
    assert [(f.row, f.phase, f.position, f.final) for f in firings] == [(0, "prompt", 2, False)]
    pool = runs[0].pools[("demo", "prompt")]
    assert (pool.n, pool.value) == (2, 3.0)
    assert runs[1].pools[("demo", "prompt")].n == 0
    assert totals.sums[0].tolist() == [4.0, 6.0] and totals.counts.tolist() == [2, 0, 2, 0]  # sums: every run
    again = observe(_readout(spec), runs, _step((1, 1), [True] * 2, [True] * 2, start=3), feats[:2], scores[1:3])
    assert [(f.row, f.phase) for f in again] == [(0, "completion")]  # the prompt does not fire again


def test_final_firings_judge_each_phase_once_skipping_blocked_runs_and_unused_detectors() -> None:
    spec, other = tiny_spec(threshold=1.0, cooldown_tokens=100), tiny_spec(name="other", threshold=-5.0)
    readout = _readout(spec, other)
    runs = _runs(3, spec, other)
    runs[1].blocked = True
    runs[2].pools.clear()  # a vLLM request narrowed to no detector of this readout
    for run in runs[:2]:
        run.pools[("demo", "prompt")].extend([2.0], [4])  # over the threshold, never checked
    verdicts = final_firings([readout], runs)
    assert [(f.row, f.spec.name, f.phase, f.position, f.final) for f in verdicts] == [(0, "demo", "prompt", 4, True)]
    assert final_firings([readout], runs) == []  # reported once


def test_an_alert_carries_its_span_text_and_the_features_that_carried_the_score() -> None:
    spec = tiny_spec(threshold=1.0)  # features 3 (weight 1) and 5 (weight 0.5)
    readout, run = _readout(spec), _runs(1, spec)[0]
    run.token_ids = [2, 3, 4, 5]
    run.feature_sums[(HP, "prompt")] += torch.tensor([2.0, 8.0])  # over two tokens: means 1 and 4
    run.feature_counts[(HP, "prompt")] += 2
    pool = run.pools[("demo", "prompt")]
    pool.extend([3.0, 3.0], [1, 2])
    firing = Firing(0, readout, spec, "prompt", pool, 2)
    alert = record_alert(firing, run, model_name="tiny", fired_at=5.0, tokenizer=TinyTokenizer(),
                         labels=lambda hp, f: f"label {f}")
    assert (alert.span, alert.text, alert.score, alert.run_id) == ((1, 3), "ab", 3.0, "run-0")
    assert [(e.feature, e.activation, e.contribution, e.label) for e in alert.evidence] == [
        (5, 4.0, 2.0, "label 5"), (3, 1.0, 1.0, "label 3")]
    assert [e.share for e in alert.evidence] == pytest.approx([2 / 3, 1 / 3])
    assert alert.unexplained is None and alert.unexplained_share is None  # an SAE readout explains itself
    assert run.alerts == [alert] and run.fired == {"demo": 2}
    assert evidence(readout, run, spec, "completion") == ([], None, None)  # nothing read in that phase


def test_a_dense_probe_is_explained_by_its_evidence_features_and_says_what_they_leave_out() -> None:
    """score = Σ aᵢ·(w·dᵢ) + w·b_dec + w·ε + b: the listed features' parts, and the rest as unexplained."""
    spec = tiny_spec(kind="probe", features=[], probe_weights="probes/demo.safetensors", bias=-1.0, threshold=1.0,
                     evidence_offset=0.25, evidence_features=[FeatureWeight(id=3, weight=0.5),
                                                              FeatureWeight(id=5, weight=-0.25)])
    readout, run = _readout(spec), _runs(1, spec)[0]
    run.token_ids = [2, 3, 4, 5]
    run.feature_sums[(HP, "prompt")] += torch.tensor([6.0, 4.0])  # means 3 and 2 over two tokens
    run.feature_counts[(HP, "prompt")] += 2
    pool = run.pools[("demo", "prompt")]
    pool.extend([2.0, 3.0], [1, 2])  # mean token score 2.5
    alert = record_alert(Firing(0, readout, spec, "prompt", pool, 2), run, model_name="tiny", fired_at=5.0)
    # contributions: #3 0.5·3 = 1.5, #5 −0.25·2 = −0.5; unexplained 2.5 − (−1) − 0.25 − 1.0 = 2.25
    assert [(e.feature, e.contribution) for e in alert.evidence] == [(3, 1.5)]  # only what pushed the score up
    assert alert.unexplained == pytest.approx(2.25)
    assert alert.evidence[0].share == pytest.approx(1.5 / (1.5 + 0.5 + 2.25))
    assert alert.unexplained_share == pytest.approx(2.25 / (1.5 + 0.5 + 2.25))


def test_evidence_features_are_for_probes_only() -> None:
    with pytest.raises(ValueError, match="evidence_features"):
        tiny_spec(evidence_features=[FeatureWeight(id=3, weight=1.0)])
