import pytest
import torch

from compress.layout import Layout, Segment
from compress.metacompress import MetaCompress, pool_tokens, pool_windows
from compress.reduction import num_keep


@pytest.mark.parametrize("n", [7, 576, 2144])
@pytest.mark.parametrize("rate", [0.05, 0.5, 0.7, 0.9, 0.99])
def test_matrix_is_row_stochastic_and_output_is_p_times_x(n, rate):
    torch.manual_seed(n)
    d = 32
    x = torch.randn(n, d)
    m = num_keep(n, rate)
    assert m == max(1, round(n * (1 - rate)))
    module = MetaCompress(d, compress_dim=16)
    out = module(x, m)
    assert out.tokens.shape == (m, d) and out.matrix.shape == (m, n)
    assert (out.matrix >= 0).all()
    torch.testing.assert_close(out.matrix.sum(-1), torch.ones(m))
    torch.testing.assert_close(out.tokens, out.matrix @ x)


def test_num_keep_rejects_rates_outside_open_interval():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            num_keep(10, bad)
    assert num_keep(7, 0.99) == 1


def test_pool_tokens_matches_plain_windows():
    n, m, k = 10, 4, 3
    z = torch.arange(n, dtype=torch.float32)[:, None]
    pooled = pool_tokens(z, m, k)
    # centres floor((i + 0.5) * 10 / 4) = 1, 3, 6, 8; windows of 3 clipped to [0, 9]
    expected = [(0 + 1 + 2) / 3, (2 + 3 + 4) / 3, (5 + 6 + 7) / 3, (7 + 8 + 9) / 3]
    torch.testing.assert_close(pooled[:, 0], torch.tensor(expected))
    edge = pool_tokens(z, 1, 5)  # centre 5, window 3..7
    assert edge.item() == pytest.approx(5.0)
    clipped = pool_tokens(torch.arange(3.0)[:, None], 3, 3)  # centres 0,1,2: first window is {0, 1}
    torch.testing.assert_close(clipped[:, 0], torch.tensor([0.5, 1.0, 1.5]))


def argmax_hits_source(d, n=576, rate=0.9, dc=256, seed=0):
    torch.manual_seed(seed)
    module = MetaCompress(d, compress_dim=dc, kernel_size=1)
    x = torch.randn(n, d)
    m = num_keep(n, rate)
    with torch.no_grad():
        p = module(x, m).matrix
    source = torch.floor((torch.arange(m) + 0.5) * n / m).long()
    return (p.argmax(-1) == source).float().mean().item(), p[torch.arange(m), source].mean().item()


def test_initialisation_behaves_like_down_sampling_for_large_d():
    """Appendix 9: with Wq = Wk and kernel 1, each row peaks on the token its query was sampled from."""
    hits_large, weight_large = argmax_hits_source(d=4096)
    hits_small, _ = argmax_hits_source(d=16)
    print(f"appendix 9 check: argmax on source token for {hits_large:.3f} of rows at d=4096 "
          f"(mean weight {weight_large:.3f}), {hits_small:.3f} at d=16")
    assert hits_large >= 0.98
    assert weight_large > 0.9  # nearly a one-hot down-sampling matrix
    assert hits_small < hits_large  # the claim depends on d being large


def test_initialisation_with_kernel_3_is_average_pooling_over_the_window():
    torch.manual_seed(0)
    n, d, m = 576, 4096, 58
    module = MetaCompress(d, compress_dim=256, kernel_size=3)
    with torch.no_grad():
        p = module(torch.randn(n, d), m).matrix
    index, valid = pool_windows(n, m, 3)
    in_window = torch.stack([p[i, index[i][valid[i]]].sum() for i in range(m)])
    print(f"appendix 9 check, kernel 3, d=4096: mass inside the pooling window {in_window.mean():.4f} (min {in_window.min():.4f})")
    assert in_window.min() > 0.95


def test_gradients_reach_every_parameter_and_eval_is_deterministic():
    torch.manual_seed(0)
    d, n = 16, 31
    layout = Layout(n, (Segment("base", 4, 4, 0, 4), Segment("crops", 3, 4, 16, 5)), (20, 25, 30))
    layout.validate()
    module = MetaCompress(d, compress_dim=8)
    x = torch.randn(n, d)
    out = module(x, 5, layout)
    (out.tokens.pow(2).sum() + out.matrix.pow(2).sum()).backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    again = module(x, 5, layout)
    assert torch.equal(out.matrix, again.matrix)


def test_position_embeddings_interpolate_per_segment_and_mark_newlines():
    d = 4
    module = MetaCompress(d, compress_dim=4, reference_grid=(2, 2))
    with torch.no_grad():
        module.position_table.copy_(torch.arange(d * 4, dtype=torch.float32).reshape(d, 2, 2))
        module.layout_token.fill_(-1.0)
    layout = Layout(2 * 2 + 2 * 3, (Segment("base", 2, 2, 0, 2), Segment("crops", 2, 2, 4, 3)), (6, 9))
    emb = module.position_embeddings(layout)
    torch.testing.assert_close(emb[0:4], module.position_table.flatten(1).T)  # same size: identity
    torch.testing.assert_close(emb[[4, 5, 7, 8]], module.position_table.flatten(1).T)
    assert (emb[[6, 9]] == -1).all()


def test_batch_of_different_lengths_equals_one_at_a_time():
    torch.manual_seed(1)
    d = 12
    module = MetaCompress(d, compress_dim=6)
    with torch.no_grad():
        module.w_query.add_(0.1 * torch.randn_like(module.w_query))
    xs = [torch.randn(n, d) for n in (9, 25, 16)]
    keeps = [3, 7, 1]
    batched = module(xs, keeps)
    for x, m, out in zip(xs, keeps, batched):
        single = module(x, m)
        torch.testing.assert_close(out.tokens, single.tokens)
        torch.testing.assert_close(out.matrix, single.matrix)


def test_save_and_load_round_trip_and_clear_errors(tmp_path):
    module = MetaCompress(8, compress_dim=4, kernel_size=3, reference_grid=(3, 3))
    module.save_pretrained(tmp_path / "mc")
    loaded = MetaCompress.from_pretrained(tmp_path / "mc")
    for key, value in module.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MetaCompress.from_pretrained(tmp_path / "missing")
    MetaCompress(8, compress_dim=5, reference_grid=(3, 3)).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "mc" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"tensor '\w+' has shape"):
        MetaCompress.from_pretrained(tmp_path / "other")


def test_bad_num_keep_and_layout_are_errors():
    module = MetaCompress(4, compress_dim=2)
    with pytest.raises(ValueError, match="num_keep"):
        module(torch.randn(5, 4), 6)
    with pytest.raises(ValueError, match="layout"):
        module(torch.randn(5, 4), 2, Layout.grid(2, 2))


def test_memoised_position_embeddings_follow_parameter_updates():
    torch.manual_seed(3)
    module = MetaCompress(8, compress_dim=4, reference_grid=(3, 3))
    layout = Layout.grid(4, 4)
    x = torch.randn(16, 8)
    with torch.no_grad():
        module(x, 5, layout)  # fills the memo
        module.position_table.add_(torch.randn_like(module.position_table))
        memo_path = module(x, 5, layout).matrix
    fresh = module(x, 5, layout).matrix.detach()  # with gradients: no memo
    torch.testing.assert_close(memo_path, fresh)


def test_memoised_position_embeddings_are_dropped_when_the_mode_switches():
    """A write through ``.data`` (as DeepSpeed's optimizer steps write) leaves the version counter alone; a
    validation pass switches the module to eval first, and must then see the new table."""
    torch.manual_seed(3)
    module = MetaCompress(8, compress_dim=4, reference_grid=(3, 3))
    layout = Layout.grid(4, 4)
    x = torch.randn(16, 8)
    module.eval()
    with torch.no_grad():
        before = module(x, 5, layout).matrix  # fills the memo
    module.train()
    module.position_table.data.add_(torch.randn_like(module.position_table))  # no version bump
    module.eval()
    with torch.no_grad():
        after = module(x, 5, layout).matrix
    fresh = MetaCompress(8, compress_dim=4, reference_grid=(3, 3))
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(after, fresh(x, 5, layout).matrix.detach())
    assert not torch.allclose(before, after)
