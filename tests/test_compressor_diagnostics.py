"""The diagnostics of a compression matrix (compress.analysis, `metacompress analyze compressor`) against values
computed by hand on small matrices."""

import math

import pytest
import torch

from compress.analysis import (column_share, effective_tokens, mask_mass, matrix_statistics, near_mass,
                               oracle_distance, rectangle_mass, row_entropy, row_spread, total_variation,
                               window_mass)

P = torch.tensor([[0.5, 0.5, 0.0, 0.0],
                  [1.0, 0.0, 0.0, 0.0]])


def test_row_entropy_and_effective_tokens_by_hand():
    assert row_entropy(P).tolist() == pytest.approx([math.log(2), 0.0])
    assert effective_tokens(P).tolist() == pytest.approx([2.0, 1.0])
    uniform = torch.full((3, 8), 1 / 8)
    assert row_entropy(uniform).tolist() == pytest.approx([math.log(8)] * 3)
    q = torch.tensor([[0.25, 0.25, 0.5]])  # -2 * 0.25 ln 0.25 - 0.5 ln 0.5 = 1.5 ln 2
    assert float(row_entropy(q)[0]) == pytest.approx(1.5 * math.log(2))


def test_column_share_and_mask_mass_by_hand():
    assert column_share(P).tolist() == pytest.approx([0.75, 0.25, 0.0, 0.0])
    assert mask_mass(P, torch.tensor([True, False, False, True])) == pytest.approx((0.75, 0.5))
    assert mask_mass(P, torch.tensor([False, False, True, True])) == pytest.approx((0.0, 0.5))


def test_window_mass_by_hand():
    # n = 4, m = 2, kernel 1: the windows are the single tokens floor((i + 0.5) * 4 / 2) = 1 and 3.
    p = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    assert window_mass(p, 1).tolist() == pytest.approx([1.0, 0.5])
    # kernel 3: windows {0, 1, 2} and {2, 3} (clipped at the end)
    assert window_mass(p, 3).tolist() == pytest.approx([1.0, 1.0])
    assert window_mass(P, 3).tolist() == pytest.approx([1.0, 0.0])


def test_near_mass_by_hand():
    from compress.layout import Layout

    # 4x4 grid, m = 4: centres 2, 6, 10, 14 (row r, column 2), query spacing^2 1/4 in image units, token pitch 1/4:
    # "near" is within two pitches in a line or one diagonally. Row 0 puts 0.5 one row below its centre (token 6,
    # near) and 0.5 on token 12 (three rows down, two columns left: far); rows 1-3 sit on their centres.
    p = torch.zeros(4, 16)
    p[0, 6] = p[0, 12] = 0.5
    p[1, 6] = p[2, 10] = p[3, 14] = 1.0
    assert near_mass(p, Layout.grid(4, 4)).tolist() == pytest.approx([0.5, 1.0, 1.0, 1.0])
    p[3] = 0.0
    p[3, 3] = 1.0  # row 3's centre is (3, 2): (0, 3) is three rows up
    assert matrix_statistics(p, layout=Layout.grid(4, 4))["near_mass"] == pytest.approx(2.5 / 4)


def test_rectangle_mass_by_hand():
    from compress.layout import Layout

    # 4x4 grid, m = 4: Spatial's rectangles are the 2x2 quadrants, rows 0-1 top-left / top-right, 2-3 bottom.
    p = torch.zeros(4, 16)
    p[0, 0] = p[0, 5] = 0.5  # both in the top-left quadrant
    p[1, 2], p[1, 15] = 0.25, 0.75  # top-right, then bottom-right (not its own)
    p[2, 8] = 1.0  # bottom-left
    p[3] = 1.0 / 16  # uniform: a quarter inside
    assert rectangle_mass(p, Layout.grid(4, 4)).tolist() == pytest.approx([1.0, 0.25, 1.0, 0.25])
    assert matrix_statistics(p, layout=Layout.grid(4, 4))["rectangle_mass"] == pytest.approx(2.5 / 4)


def test_total_variation_row_spread_and_oracle_distance_by_hand():
    assert float(total_variation(P[0], P[1])) == pytest.approx(0.5)
    assert row_spread(torch.full((4, 5), 0.2)) == 0.0  # identical rows
    assert row_spread(torch.eye(3)) == pytest.approx(1.0)  # disjoint rows
    # three rows: TV(a,b) = 0.5, TV(a,c) = 1, TV(b,c) = 0.5 -> mean over ordered pairs 2/3
    three = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    assert row_spread(three) == pytest.approx(2 / 3)
    # the same rows in another order are at distance 0
    assert oracle_distance(P.flip(0), P) == pytest.approx({"column_tv": 0.0, "row_tv": 0.0})
    oracle = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # column shares: P (0.75, 0.25, 0, 0), oracle (0.5, 0, 0.5, 0) -> TV 0.5; oracle row 0 is 1 from both rows of P,
    # oracle row 1 equals P's row 1 -> row_tv = (1 + 0) / 2
    assert oracle_distance(P, oracle) == pytest.approx({"column_tv": 0.5, "row_tv": 0.5})
    with pytest.raises(ValueError, match="input tokens"):
        oracle_distance(P, torch.ones(2, 3) / 3)


def test_matrix_statistics_collects_the_values():
    stats = matrix_statistics(P, kernel_size=1, mask=torch.tensor([True, False, False, False]), oracle=P)
    assert stats["row_entropy"] == pytest.approx(math.log(2) / 2)
    assert stats["effective_tokens"] == pytest.approx(1.5)
    assert stats["log_n"] == pytest.approx(math.log(4))
    assert stats["max_column_share"] == pytest.approx(0.75)
    # column shares (0.75, 0.25): entropy -(0.75 ln 0.75 + 0.25 ln 0.25)
    assert stats["effective_columns"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert stats["row_spread"] == pytest.approx(0.5)
    assert (stats["mask_mass"], stats["mask_area"]) == pytest.approx((0.75, 0.25))
    assert stats["oracle_column_tv"] == 0.0 and stats["oracle_row_tv"] == 0.0
    # kernel 1, m = 2, n = 4: windows are tokens 1 and 3; P's rows put 0.5 and 0 there
    assert stats["window_mass"] == pytest.approx(0.25)
