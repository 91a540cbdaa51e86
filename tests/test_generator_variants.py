"""The generators of P (compress.metacompress, docs/design.md §4.1): the "normed" variant starts as pooling on
features of any scale and similarity; the paper's does only when q.k / sqrt(dc) is large."""

import math

import pytest
import torch
import torch.nn.functional as F

from compress.analysis import row_entropy, window_mass
from compress.layout import Layout
from compress.metacompress import MetaCompress, pool_tokens

SIDE, D = 12, 64
N = SIDE * SIDE


def features(scale: float, shared: float, seed: int = 0) -> torch.Tensor:
    """(N, D): a component shared by every token (weight ``shared``) plus per-token noise, times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(D, generator=g)
    return scale * (shared * common + torch.randn(N, D, generator=g))


def reference_normed_logits(module: MetaCompress, x: torch.Tensor, m: int) -> torch.Tensor:
    """The variant written out from its definition, independently of MetaCompress.logits."""
    z = x - x.mean(0)
    z = z / z.norm(dim=1, keepdim=True) * math.sqrt(x.shape[1])
    table = module.position_table.detach()
    z = z + F.interpolate(table[None], size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0].flatten(1).T
    q = pool_tokens(z, m, module.kernel_size) @ module.w_query.detach() * module.omega.detach()
    k = z @ module.w_key.detach()
    cos = (q / q.norm(dim=1, keepdim=True)) @ (k / k.norm(dim=1, keepdim=True)).T
    return module.log_temperature.detach().exp() * cos


def make(generator: str, seed: int = 0) -> MetaCompress:
    torch.manual_seed(seed)
    return MetaCompress(D, compress_dim=64, kernel_size=3, reference_grid=(SIDE, SIDE), generator=generator)


def test_normed_logits_follow_the_definition():
    module = make("normed")
    x = features(3.0, 2.0)
    m = 14
    got = module.logits(x, m, Layout.grid(SIDE, SIDE))
    torch.testing.assert_close(got, reference_normed_logits(module, x, m), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("shared", [0.0, 5.0, 50.0])
def test_normed_starts_as_pooling_on_any_scale_and_similarity(scale, shared):
    module = make("normed")
    x = features(scale, shared)
    with torch.no_grad():
        for m in (14, 43):  # rates 0.9 and 0.7
            out = module(x, m, Layout.grid(SIDE, SIDE))
            assert float(window_mass(out.matrix, 3).mean()) > 0.9, (scale, shared, m)
            assert float(row_entropy(out.matrix).mean()) < math.log(3) + 0.2


def test_normed_is_invariant_to_feature_scale_and_shared_component():
    module = make("normed")
    x = features(1.0, 0.0)
    common = torch.randn(D) * 100
    with torch.no_grad():
        a = module(x, 14).matrix
        b = module(1e3 * x + common, 14).matrix
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_normed_pools_a_plain_background_by_position():
    """Identical tokens (a plain background) differ only by position: the rows still start on their windows."""
    module = make("normed")
    x = torch.ones(N, D) * 7.0
    with torch.no_grad():
        p = module(x, 14, Layout.grid(SIDE, SIDE)).matrix
    assert float(window_mass(p, 3).mean()) > 0.9


def test_paper_generator_starts_uniform_on_small_or_alike_features():
    """The measured cause (README, ablation): the paper's scores scale with |x|^2, so small features give P close to
    uniform, and a large shared component makes every row alike."""
    module = make("paper")
    with torch.no_grad():
        small = module(features(1e-3, 0.0), 14).matrix
        alike = module(features(1.0, 50.0), 14).matrix
        large = module(features(10.0, 0.0), 14).matrix
    assert float(row_entropy(small).mean()) > math.log(N) - 0.01  # uniform: rows spread over every token
    assert float(window_mass(large, 3).mean()) > 0.9  # large, distinct features: pooling, as the paper says
    assert float(window_mass(alike, 3).mean()) < 0.5  # alike tokens: rows leave their windows


def test_normed_round_trips_and_keeps_learned_temperature(tmp_path):
    module = make("normed")
    with torch.no_grad():
        module.log_temperature.fill_(math.log(5.0))
    module.save_pretrained(tmp_path / "c")
    loaded = MetaCompress.from_pretrained(tmp_path / "c")
    assert loaded.generator == "normed" and float(loaded.log_temperature.detach().exp()) == pytest.approx(5.0)
    x = features(1.0, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 14).matrix, module(x, 14).matrix)
    with pytest.raises(ValueError, match="generator"):
        MetaCompress(D, generator="other")


def test_auto_generator_picks_normed_where_the_paper_starts_uniform():
    from pipeline.config import TrainConfig
    from stages.train.student import initial_entropy_share, resolve_generator

    cfg = TrainConfig(compress_dim=32, generator="auto")
    layout = [Layout.grid(SIDE, SIDE)] * 2
    small = [features(1e-3, 0.0, seed=s) for s in (1, 2)]  # the paper's P starts uniform: share ~ 1
    large = [features(10.0, 0.0, seed=s) for s in (1, 2)]  # the paper's P starts as pooling: share ~ log 3 / log n
    share_small = initial_entropy_share(D, cfg, 0, small, layout, 0.9)
    share_large = initial_entropy_share(D, cfg, 0, large, layout, 0.9)
    assert share_small > 0.99 and share_large < 0.3
    # the share is the mean row entropy over log n, recomputed here from the seeded paper module
    torch.manual_seed(0)
    probe = MetaCompress(D, 32, 3, generator="paper")
    with torch.no_grad():
        ref = sum(float(row_entropy(probe(x, 14, layout[0]).matrix).mean()) / math.log(N) for x in large) / 2
    assert share_large == pytest.approx(ref, rel=1e-6)
    assert resolve_generator("auto", share_small) == "normed" and resolve_generator("auto", share_large) == "paper"
    assert resolve_generator("paper", share_small) == "paper"


def plain_locality_distances(coords: list[tuple[float, float]], centres: list[int], spacing_sq: list[float]):
    """|c_centre(i) - c_j|^2 / s_i^2 by loops over explicit coordinates."""
    return torch.tensor([[((coords[c][0] - y) ** 2 + (coords[c][1] - x) ** 2) / s for (y, x) in coords]
                         for c, s in zip(centres, spacing_sq)], dtype=torch.float32)


def test_locality_distances_on_a_grid_by_hand():
    from compress.metacompress import locality_distances

    # 4x4 grid, 4 queries: centres floor((i + 0.5) * 16 / 4) = 2, 6, 10, 14; spacing^2 = 1 / 4 (a grid of 4 queries)
    coords = [((r + 0.5) / 4, (c + 0.5) / 4) for r in range(4) for c in range(4)]
    got = locality_distances(Layout.grid(4, 4), 4)
    torch.testing.assert_close(got, plain_locality_distances(coords, [2, 6, 10, 14], [0.25] * 4))
    assert float(got[0, 2]) == 0.0 and float(got[0, 0]) == pytest.approx(0.5 ** 2 / 0.25)  # two columns (0.5) away


def test_locality_distances_on_a_next_like_layout_with_newlines():
    from compress.layout import Segment
    from compress.metacompress import locality_distances, token_coordinates

    # base 2x2 (tokens 0-3), crops 2x3 whose rows end with a newline (4-6, 7 newline, 8-10, 11 newline)
    layout = Layout(12, (Segment("base", 2, 2, 0, 2), Segment("crops", 2, 3, 4, 4)), (7, 11))
    layout.validate()
    base = [((r + 0.5) / 2, (c + 0.5) / 2) for r in range(2) for c in range(2)]
    crop_rows = [[((r + 0.5) / 2, (c + 0.5) / 3) for c in range(3)] for r in range(2)]
    coords = base + crop_rows[0] + [crop_rows[0][-1]] + crop_rows[1] + [crop_rows[1][-1]]  # a newline: its row's end
    torch.testing.assert_close(token_coordinates(layout), torch.tensor(coords, dtype=torch.float64))
    # 4 queries: centres floor((i + 0.5) * 3) = 1, 4, 7, 10; one in the base (spacing^2 1/1), three in the crops (1/3),
    # the newline 7 counting with its row's segment
    got = locality_distances(layout, 4)
    torch.testing.assert_close(got, plain_locality_distances(coords, [1, 4, 7, 10], [1.0, 1 / 3, 1 / 3, 1 / 3]))


def test_locality_adds_its_term_to_either_generator_and_zero_is_the_paper():
    from compress.metacompress import locality_distances

    x, layout, m = features(3.0, 1.0), Layout.grid(SIDE, SIDE), 14
    for generator in ("paper", "normed"):
        plain = make(generator)
        torch.manual_seed(0)
        local = MetaCompress(D, compress_dim=64, kernel_size=3, reference_grid=(SIDE, SIDE), generator=generator,
                             locality=2.5)
        assert set(local.state_dict()) == set(plain.state_dict()) | {"log_locality"}
        with torch.no_grad():
            expected = plain.logits(x, m, layout) - 2.5 * locality_distances(layout, m)
            torch.testing.assert_close(local.logits(x, m, layout), expected, rtol=1e-5, atol=1e-4)
    off = MetaCompress(D, locality=0.0)
    assert "locality" not in off.config and not hasattr(off, "log_locality")
    with pytest.raises(ValueError, match="locality"):
        MetaCompress(D, locality=-1.0)


def test_locality_starts_each_row_near_its_window_on_a_plain_background():
    """Identical tokens: the paper's rows spread over the whole image; with locality they start around their
    windows' centres (mass within one query spacing), and training can loosen the term (its strength is learned)."""
    from compress.metacompress import locality_distances

    x, layout, m = torch.ones(N, D) * 7.0, Layout.grid(SIDE, SIDE), 14
    near = (locality_distances(layout, m) <= 1.0).float()
    for generator in ("paper", "normed"):
        torch.manual_seed(0)
        local = MetaCompress(D, compress_dim=64, reference_grid=(SIDE, SIDE), generator=generator, locality=4.0)
        p = local(x, m, layout).matrix
        assert float((p * near).sum(-1).mean()) > 0.9, generator
        (p * torch.randn_like(p)).sum().backward()  # P's rows sum to 1: a plain sum has no gradient
        assert local.log_locality.grad is not None and float(local.log_locality.grad.abs()) > 0
    with torch.no_grad():
        p = make("paper")(x, m, layout).matrix
    assert float((p * near).sum(-1).mean()) < 0.2


def test_locality_round_trips_with_its_learned_strength(tmp_path):
    torch.manual_seed(0)
    module = MetaCompress(D, compress_dim=64, reference_grid=(SIDE, SIDE), generator="normed", locality=1.0)
    with torch.no_grad():
        module.log_locality.fill_(math.log(0.3))
    module.save_pretrained(tmp_path / "c")
    loaded = MetaCompress.from_pretrained(tmp_path / "c")
    assert loaded.config["locality"] == 1.0 and float(loaded.log_locality.detach().exp()) == pytest.approx(0.3)
    x = features(1.0, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 14).matrix, module(x, 14).matrix)


def plain_rectangles(height: int, width: int, bands: list[list[int]]) -> list[set[int]]:
    """Row-major token sets of rectangles given, per horizontal band (equal split of the rows), its cells' column
    counts (equal split of the columns), written out without the project's code."""
    out = []
    for b, cols in enumerate(bands):
        r0, r1 = b * height // len(bands), (b + 1) * height // len(bands)
        for c in range(cols[0]):
            c0, c1 = c * width // cols[0], (c + 1) * width // cols[0]
            out.append({r * width + k for r in range(r0, r1) for k in range(c0, c1)})
    return out


def test_spatial_windows_are_spatials_rectangles_by_hand():
    from compress.metacompress import spatial_windows

    # 4x4 grid, 4 rows of P: 2 bands of 2 cells, the four 2x2 quadrants
    quads = plain_rectangles(4, 4, [[2], [2]])
    expected = torch.tensor([[j in q for j in range(16)] for q in quads])
    assert torch.equal(spatial_windows(Layout.grid(4, 4), 4), expected)
    # 6x6 grid, 5 rows: round(6 * sqrt(5 / 36)) = 2 bands of 3 and 2 cells
    rects = plain_rectangles(6, 6, [[3], [2]])
    assert torch.equal(spatial_windows(Layout.grid(6, 6), 5),
                       torch.tensor([[j in r for j in range(36)] for r in rects]))


def test_spatial_prior_starts_as_spatial_exactly_and_learns_a_residual():
    """With the score gate at 0, P is Spatial's pooling matrix up to exp(-beta) outside the rectangles, with either
    generator and on a layout with newlines; logits = gate * scores - beta * outside; the gradient reaches the gate
    and beta, and the projections get theirs once the gate has moved."""
    from compress.baselines.spatial import spatial_matrix
    from compress.layout import Segment
    from compress.metacompress import spatial_windows

    next_like = Layout(12, (Segment("base", 2, 2, 0, 2), Segment("crops", 2, 3, 4, 4)), (7, 11))
    for layout, m in ((Layout.grid(SIDE, SIDE), 14), (next_like, 4)):
        n = layout.num_tokens
        x = torch.randn(n, D) * 5.0
        for generator in ("paper", "normed"):
            torch.manual_seed(0)
            prior = MetaCompress(D, compress_dim=64, reference_grid=(SIDE, SIDE), generator=generator,
                                 spatial_prior=12.0)
            assert not prior.positions_at_window_centres
            red = prior(x, m, layout)
            torch.testing.assert_close(red.matrix, spatial_matrix(layout, m), atol=n * math.exp(-12.0), rtol=0)
            (red.tokens * torch.randn_like(red.tokens)).sum().backward()
            assert float(prior.score_gate.grad.abs()) > 0 and float(prior.log_spatial_prior.grad.abs()) > 0
            assert float(prior.w_query.grad.abs().max()) == 0.0  # gated off at the start
            with torch.no_grad():
                prior.score_gate.fill_(0.7)
                prior.log_spatial_prior.fill_(math.log(3.0))
                outside = (~spatial_windows(layout, m)).float()
                # the scores the same generator gives with these rectangle-mean queries, from a module without the
                # prior whose pooling windows are Spatial's rectangles: written out from the definition
                z = x
                if generator == "normed":
                    z = z - z.mean(0)
                    z = z / z.norm(dim=1, keepdim=True) * math.sqrt(D)
                z = z + prior.position_embeddings(layout)
                inside = 1.0 - outside
                q = (inside / inside.sum(1, keepdim=True)) @ z @ prior.w_query
                k = z @ prior.w_key
                if generator == "normed":
                    scores = prior.log_temperature.exp() * F.normalize(q * prior.omega, dim=1) @ F.normalize(k, dim=1).T
                else:
                    scores = (q * prior.omega) @ k.T / math.sqrt(64)
                torch.testing.assert_close(prior.logits(x, m, layout), 0.7 * scores - 3.0 * outside,
                                           rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="locality"):
        MetaCompress(D, spatial_prior=5.0, locality=1.0)
    with pytest.raises(ValueError, match="spatial_prior"):
        MetaCompress(D, spatial_prior=-1.0)
    off = MetaCompress(D)
    assert "spatial_prior" not in off.config and not hasattr(off, "score_gate") and off.positions_at_window_centres


def test_spatial_prior_round_trips_with_its_learned_gate_and_strength(tmp_path):
    torch.manual_seed(0)
    module = MetaCompress(D, compress_dim=64, reference_grid=(SIDE, SIDE), spatial_prior=10.0)
    with torch.no_grad():
        module.log_spatial_prior.fill_(math.log(2.0))
        module.score_gate.fill_(0.25)
    module.save_pretrained(tmp_path / "c")
    loaded = MetaCompress.from_pretrained(tmp_path / "c")
    assert loaded.config["spatial_prior"] == 10.0 and not loaded.positions_at_window_centres
    assert float(loaded.score_gate) == 0.25 and float(loaded.log_spatial_prior.exp()) == pytest.approx(2.0)
    x = features(1.0, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 14).matrix, module(x, 14).matrix)
