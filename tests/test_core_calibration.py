"""Calibration over a whole model: statistics, layer selection, rank policies, failures."""

import pytest
import torch
from torch import nn

from comfyui_svdquant.core.calibrate import (capture_inputs, find_target_linears, quantize_layers,
                                             format_report, summarize)
from comfyui_svdquant.core.config import QuantConfig, RankPolicy
from comfyui_svdquant.core.qlinear import SVDQuantLinear
from comfyui_svdquant.core.stats import ActivationStats, NonFiniteActivationError
from synthetic import outlier_activations


class Toy(nn.Module):
    """Embedding-like input layer, two blocks with outlier-heavy inputs, and a tiny head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(128, 128)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
                                     for _ in range(2)])
        self.head = nn.Linear(128, 8)
        with torch.no_grad():  # an identity embedding keeps the input's outlier channels in the residual stream
            self.embed.weight.copy_(torch.eye(128))
            self.embed.bias.zero_()

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def _batches(n, gen):
    return [outlier_activations(64, 128, gen=gen) for _ in range(n)]


def test_stats_keep_bounded_uniform_sample_and_exact_max():
    g = torch.Generator().manual_seed(0)
    s = ActivationStats(64, max_rows=100, generator=g)
    xs = [torch.randn(70, 64) for _ in range(10)]
    for x in xs:
        s.update(x)
    allx = torch.cat(xs)
    assert s.rows_seen == 700 and s.sample.shape == (100, 64)
    assert torch.equal(s.absmax, allx.abs().amax(0))
    # every kept row is a real row from the stream
    d = torch.cdist(s.sample, allx, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert torch.all(d < 1e-5)
    # roughly uniform: kept rows come from both halves of the stream
    idx = torch.cdist(s.sample, allx, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    assert 20 < int((idx < 350).sum()) < 80


def test_stats_refuse_non_finite_activations_naming_the_layer():
    s = ActivationStats(8, name="blocks.3.attn.to_q")
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="blocks.3.attn.to_q"):
        s.update(x)


def test_outlier_report_counts_planted_channels():
    g = torch.Generator().manual_seed(3)
    s = ActivationStats(128)
    s.update(outlier_activations(512, 128, n_outliers=5, gen=g))
    rep = s.outlier_report(k_std=3.0)
    assert rep["outlier_channels"] >= 3 and rep["max_over_median"] > 20


def test_layer_selection_skips_patterns_and_small_layers():
    m = Toy()
    cfg = QuantConfig(skip_patterns=("embed",))
    names = set(find_target_linears(m, cfg))
    assert names == {"blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"}  # head is too small (8 out)


def _calibrated(policy, seed=0):
    torch.manual_seed(seed)
    m = Toy().eval()
    cfg = QuantConfig(rank=policy, skip_patterns=("embed",), alpha_grid=(0.3, 0.5, 0.7), sample_rows=256)
    layers = find_target_linears(m, cfg)
    g = torch.Generator().manual_seed(seed)
    data = _batches(4, g)
    with torch.no_grad(), capture_inputs(layers, cfg) as stats:
        for x in data:
            m(x)
    assert all(h == {} or not h for h in [l._forward_pre_hooks for l in layers.values()])  # hooks removed
    seen = []
    res = quantize_layers(layers, stats, cfg, progress=lambda d, t, n: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1]
    return m, layers, res, data


def _swap(m, res):
    for name, q in res.items():
        parent_name, _, child = name.rpartition(".")
        parent = m.get_submodule(parent_name)
        setattr(parent, child, SVDQuantLinear.from_tensors(q.tensors()))


def test_fixed_rank_model_output_close_and_better_than_naive():
    m, layers, res, data = _calibrated(RankPolicy("fixed", 16))
    with torch.no_grad():
        y16 = torch.cat([m(x) for x in data])
    _swap(m, res)
    with torch.no_grad():
        y4 = torch.cat([m(x) for x in data])
    rel = float((y4 - y16).norm() / y16.norm())
    s = summarize(res)
    assert s["layers"] == 4 and all(q.rank == 16 for q in res.values())
    assert s["mean_error"] < 0.7 * s["mean_error_naive_w4a4"]  # measured 0.42x at seed 0 (GPTQ on)
    assert rel < 0.1, rel
    assert "mean rank 16.0" in format_report(res)


def test_error_budget_policy_meets_budget_with_smallest_rank():
    _, _, res, _ = _calibrated(RankPolicy("error", rank=16, error_budget=0.05, candidates=(0, 4, 8, 16, 32, 64)))
    for q in res.values():
        assert q.report["error"] <= 0.05 * 1.05 or q.rank == 64


def test_size_budget_policy_spends_at_most_the_budget():
    _, layers, res, _ = _calibrated(RankPolicy("size", rank=8, candidates=(0, 4, 8, 16, 32)))
    spent = sum(q.rank * (l.in_features + l.out_features) for q, l in zip(res.values(), layers.values()))
    budget = sum(8 * (l.in_features + l.out_features) for l in layers.values())
    assert spent <= budget
    assert len({q.rank for q in res.values()}) >= 1


def test_fixed_rank_too_large_names_the_layer():
    torch.manual_seed(0)
    m = Toy()
    cfg = QuantConfig(rank=RankPolicy("fixed", 200), skip_patterns=("embed",))
    layers = find_target_linears(m, cfg)
    with torch.no_grad(), capture_inputs(layers, cfg) as stats:
        m(torch.randn(8, 128))
    with pytest.raises(ValueError, match=r"rank 200 is larger than layer blocks\.0\.0"):
        quantize_layers(layers, stats, cfg)


def test_zero_calibration_samples_is_an_error():
    m = Toy()
    cfg = QuantConfig(skip_patterns=("embed",))
    layers = find_target_linears(m, cfg)
    with capture_inputs(layers, cfg) as stats:
        pass
    with pytest.raises(ValueError, match="0 calibration samples"):
        quantize_layers(layers, stats, cfg)
