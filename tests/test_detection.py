"""Detection's per-(run, phase) feature sums: exactly what adding the read tokens one by one gives."""

from __future__ import annotations

import pytest
import torch

from featurewatch.detection import _add_totals
from featurewatch.positions import StepTokens
from featurewatch.session import FeatureTotals


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
