import pytest
import torch

from compress.baselines import FEATURE_REDUCERS
from compress.baselines.spatial import spatial_matrix, split_budget
from compress.layout import Layout, Segment


def test_random_is_seeded_sorted_and_without_replacement():
    x = torch.arange(20.0)[:, None]
    a = FEATURE_REDUCERS["random"](x, 6, seed=3)
    b = FEATURE_REDUCERS["random"](x, 6, seed=3)
    c = FEATURE_REDUCERS["random"](x, 6, seed=4)
    assert torch.equal(a.keep_indices, b.keep_indices)
    assert not torch.equal(a.keep_indices, c.keep_indices)
    assert a.keep_indices.tolist() == sorted(set(a.keep_indices.tolist()))
    assert torch.equal(a.tokens[:, 0], a.keep_indices.float())


def test_sample_keeps_equidistant_tokens():
    x = torch.arange(10.0)[:, None]
    out = FEATURE_REDUCERS["sample"](x, 4)
    assert out.keep_indices.tolist() == [1, 3, 6, 8]
    assert FEATURE_REDUCERS["sample"](torch.arange(576.0)[:, None], 144).keep_indices[:3].tolist() == [2, 6, 10]
    assert FEATURE_REDUCERS["sample"](x, 10).keep_indices.tolist() == list(range(10))


def test_spatial_pools_2x2_blocks_of_a_4x4_grid():
    x = torch.arange(16.0)[:, None]
    out = FEATURE_REDUCERS["spatial"](x, 4, Layout.grid(4, 4))
    # blocks {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
    assert out.tokens[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    torch.testing.assert_close(out.tokens, out.matrix @ x)


@pytest.mark.parametrize("m", [1, 5, 7, 58, 143, 576])
def test_spatial_budget_is_exact_and_each_token_pooled_once(m):
    p = spatial_matrix(Layout.grid(24, 24), m)
    assert p.shape == (m, 576)
    torch.testing.assert_close(p.sum(-1), torch.ones(m))
    assert ((p > 0).sum(0) == 1).all()  # the rectangles tile the grid


def test_spatial_splits_budget_over_segments_and_skips_newlines():
    layout = Layout(4 + 2 * 5, (Segment("base", 2, 2, 0, 2), Segment("crops", 2, 4, 4, 5)), (8, 13))
    layout.validate()
    p = spatial_matrix(layout, 6)
    assert p.shape == (6, 14)
    assert p[:, [8, 13]].abs().sum() == 0
    assert (p[:, :4] > 0).any(-1).sum() == 2 and (p[:, 4:] > 0).any(-1).sum() == 4
    assert split_budget(7, [4, 8, 0]) == [2, 5, 0]  # 2.33, 4.67, 0 -> the larger remainder wins
    assert sum(split_budget(13, [5, 5, 5])) == 13
