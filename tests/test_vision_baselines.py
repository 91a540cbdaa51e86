"""Vision-tower baselines (ToMe, PruMerge, PruMerge+, VisionZip) on a tiny random CLIPVisionModel.

Each method is checked against a plain, slow reference of its published algorithm written here with loops (which
tokens are kept or merged, with which weights), for exact budgets, and for batch == one image at a time.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
np = pytest.importorskip("numpy")


def _tower(image_size: int, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(image_size=image_size, patch_size=8, num_hidden_layers=2, hidden_size=64,
                                        intermediate_size=128, num_attention_heads=4)
    return transformers.CLIPVisionModel(cfg).eval()


@pytest.fixture(scope="module")
def tower16():
    """16 patches + [CLS]."""
    return _tower(32, 0)


@pytest.fixture(scope="module")
def tower64():
    """64 patches + [CLS]; the last layer's queries scaled up so [CLS] attention has clear outliers."""
    m = _tower(64, 1)
    with torch.no_grad():
        m.encoder.layers[-1].self_attn.q_proj.weight.mul_(4.0)
    return m


def _pixels(b: int, size: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def _hidden(model, pv):
    with torch.no_grad():
        return model(pixel_values=pv, output_hidden_states=True).hidden_states


def _close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- hooks


def test_hooks_capture_qk_and_leave_the_model_unchanged(tower16):
    from compress.baselines._clip_hooks import capture_qk
    from compress.baselines.vision import VISION_REDUCERS

    pv = _pixels(2, 32)
    clean = copy.deepcopy(tower16)  # never hooked
    ref = _hidden(clean, pv)
    layer = tower16.encoder.layers[1]
    with capture_qk(tower16, [1]) as qk:
        inside = _hidden(tower16, pv)
    assert all(torch.equal(x, y) for x, y in zip(inside, ref))
    with torch.no_grad():
        want_q = layer.self_attn.q_proj(layer.layer_norm1(ref[1]))
    assert torch.allclose(qk[1]["q"], want_q, atol=1e-6)
    with pytest.raises(RuntimeError), capture_qk(tower16, [0, 1]):
        raise RuntimeError("hooks must go even on error")
    for name in ("tome", "prumerge_plus", "visionzip"):
        VISION_REDUCERS[name](tower16, pv, 6, feature_layer=-1 if name == "tome" else -2)
    VISION_REDUCERS["prumerge"](tower16, pv)
    for lay in tower16.encoder.layers:
        assert not lay.self_attn.q_proj._forward_hooks and not lay.self_attn.k_proj._forward_hooks
    after = _hidden(tower16, pv)
    assert all(torch.equal(x, y) for x, y in zip(after, ref))


# ---------------------------------------------------------------------------------------------- ToMe


def _brute_feasible(t: int, target: int, layers: int) -> bool:
    def go(t, left):
        if left == 0:
            return t == target
        return any(go(t - r, left - 1) for r in range(0, (t - 1) // 2 + 1))
    return go(t, layers)


def test_tome_schedule_exact_capped_and_as_feasible_as_brute_force():
    from compress.baselines.tome import tome_schedule

    for t, layers in itertools.product([5, 9, 17, 30], [1, 2, 3]):
        for target in range(1, t + 1):
            feasible = _brute_feasible(t, target, layers)
            if not feasible:
                with pytest.raises(ValueError):
                    tome_schedule(t, target, layers)
                continue
            sched = tome_schedule(t, target, layers)
            assert len(sched) == layers and sum(sched) == t - target
            cur = t
            for r in sched:
                assert 0 <= r <= (cur - 1) // 2
                cur -= r
    assert tome_schedule(577, 65, 23) == [23] * 6 + [22] * 17  # LLaVA-1.5: 64 patches + [CLS] at layer -2


def _ref_tome(model, image, schedule):
    """Slow ToMe on one image: loops over heads and tokens. Returns tokens in ToMe order as dicts."""
    with torch.no_grad():
        x = model.pre_layrnorm(model.embeddings(image[None]))[0].double()
        toks = [{"x": x[i], "size": 1.0, "members": {i}} for i in range(x.shape[0])]
        for layer, r in zip(model.encoder.layers, schedule):
            attn = layer.self_attn
            xs = torch.stack([t["x"] for t in toks]).float()
            h = layer.layer_norm1(xs)
            q, k, v = attn.q_proj(h).double(), attn.k_proj(h).double(), attn.v_proj(h).double()
            dh, heads = attn.head_dim, attn.num_heads
            outs = []
            for hd in range(heads):
                sl = slice(hd * dh, (hd + 1) * dh)
                logits = q[:, sl] @ k[:, sl].T * dh ** -0.5
                logits = logits + torch.tensor([math.log(t["size"]) for t in toks], dtype=torch.float64)[None]
                outs.append(torch.softmax(logits, -1) @ v[:, sl])
            after = xs.double() + attn.out_proj(torch.cat(outs, -1).float()).double()
            for t, row in zip(toks, after):
                t["x"] = row
            metric = [sum(k[i, hd * dh:(hd + 1) * dh] for hd in range(heads)) / heads for i in range(len(toks))]
            a_ids, b_ids = list(range(0, len(toks), 2)), list(range(1, len(toks), 2))
            best = {}
            for ai in a_ids[1:]:  # [CLS] (position 0) is never merged
                cands = [(float(metric[ai] @ metric[bi] / (metric[ai].norm() * metric[bi].norm())), bi)
                         for bi in b_ids]
                best[ai] = max(cands, key=lambda c: c[0])  # first maximum on ties
            merged = sorted(best, key=lambda ai: -best[ai][0])[:r]
            b_toks = {bi: dict(toks[bi]) for bi in b_ids}
            for ai in merged:
                bt, at = b_toks[best[ai][1]], toks[ai]
                size = bt["size"] + at["size"]
                bt["x"] = (bt["x"] * bt["size"] + at["x"] * at["size"]) / size
                bt["size"], bt["members"] = size, bt["members"] | at["members"]
            toks = [toks[ai] for ai in a_ids if ai not in merged] + [b_toks[bi] for bi in b_ids]
            xs = torch.stack([t["x"] for t in toks]).float()
            xs = xs + layer.mlp(layer.layer_norm2(xs))
            for t, row in zip(toks, xs):
                t["x"] = row.double()
    return toks


@pytest.mark.parametrize("num_keep", [4, 7, 12])
def test_tome_matches_slow_reference(tower16, num_keep):
    from compress.baselines.tome import tome, tome_forward, tome_schedule

    pv = _pixels(1, 32, seed=num_keep)
    sched = tome_schedule(17, num_keep + 1, 2)
    ref = _ref_tome(tower16, pv[0], sched)
    res = tome_forward(tower16, pv, sched, track_source=True)
    assert _close(res["hidden"][0], torch.stack([t["x"] for t in ref]))
    assert res["size"][0].tolist() == [t["size"] for t in ref]
    assert [set(row.nonzero()[:, 0].tolist()) for row in res["source"][0]] == [t["members"] for t in ref]
    out = tome(tower16, pv, num_keep, feature_layer=-1, order="tome")
    assert out.shape == (1, num_keep, 64) and _close(out[0], torch.stack([t["x"] for t in ref[1:]]))
    spatial = sorted(ref, key=lambda t: min(t["members"]))
    full = tome(tower16, pv, num_keep + 1, feature_layer=-1, select_strategy="full")
    assert _close(full[0], torch.stack([t["x"] for t in spatial]))


def test_tome_without_merges_is_the_unhooked_tower(tower64):
    from compress.baselines.tome import tome

    pv = _pixels(2, 64)
    hs = _hidden(tower64, pv)
    for f in (-1, -2):
        assert _close(tome(tower64, pv, 64, feature_layer=f, order="tome"), hs[f][:, 1:])
        assert _close(tome(tower64, pv, 65, feature_layer=f, select_strategy="full"), hs[f])


def test_tome_budgets_batch_and_errors(tower64):
    from compress.baselines.tome import tome

    pv = _pixels(3, 64)
    for k in (16, 23, 40, 63):
        out = tome(tower64, pv, k, feature_layer=-1)
        assert out.shape == (3, k, 64)
        single = torch.cat([tome(tower64, pv[i:i + 1], k, feature_layer=-1) for i in range(3)])
        assert _close(out, single)
    with pytest.raises(ValueError, match="fewest reachable"):
        tome(tower64, pv, 15, feature_layer=-1)
    crops = pv[None].expand(2, 3, 3, 64, 64)  # LLaVA-NeXT: the budget holds for the whole image
    nxt = tome(tower64, crops, 70, feature_layer=-1, crops_per_image=[3, 2])
    assert nxt.shape == (2, 70, 64)
    assert _close(nxt[0], torch.cat([tome(tower64, pv[i:i + 1], s, feature_layer=-1)[0]
                                     for i, s in enumerate([24, 23, 23])]))
    assert _close(nxt[1], torch.cat([tome(tower64, pv[i:i + 1], 35, feature_layer=-1)[0] for i in range(2)]))
    with pytest.raises(ValueError):
        tome(tower64, pv, 20, feature_layer=-1, schedule=[40, 5])


# ---------------------------------------------------------------------------------------------- PruMerge


def test_iqr_outliers_match_numpy_percentile():
    from compress.baselines.prumerge import iqr_outliers

    g = torch.Generator().manual_seed(3)
    for n in (16, 37, 576):
        a = torch.rand(n, generator=g)
        a[torch.randperm(n, generator=g)[: n // 20 + 1]] += 3.0
        q1, q3 = np.percentile(a.numpy(), [25, 75])
        want = [i for i in range(n) if a[i].item() > q3 + 1.5 * (q3 - q1)]
        assert iqr_outliers(a).nonzero()[:, 0].tolist() == want


def _ref_prumerge(model, image, num_keep=None, plus=False, knn=32):
    """Slow PruMerge / PruMerge+ (official merge) on one image, from the last layer's q/k on hidden_states[-2]."""
    hs = _hidden(model, image[None])
    last = model.encoder.layers[-1]
    with torch.no_grad():
        h = last.layer_norm1(hs[-2][0])
        q, k = last.self_attn.q_proj(h).double(), last.self_attn.k_proj(h).double()
    feats = hs[-2][0, 1:].double()
    n, c = feats.shape
    logits = [float(q[0] @ k[j]) / math.sqrt(c) for j in range(n + 1)]
    z = sum(math.exp(v - max(logits)) for v in logits)
    a = [math.exp(v - max(logits)) / z for v in logits][1:]
    q1, q3 = np.percentile(np.array(a), [25, 75])
    outliers = [i for i in range(n) if a[i] > q3 + 1.5 * (q3 - q1)]
    by_attn = sorted(range(n), key=lambda i: -a[i])
    if num_keep is None:
        keep = outliers or by_attn[:1]
    elif not plus or len(outliers) >= num_keep - 1:
        keep = by_attn[: num_keep - 1]
    else:
        rest = [i for i in range(n) if i not in outliers]
        u = num_keep - 1 - len(outliers)
        keep = outliers + [rest[int((j + 0.5) * len(rest) / u)] for j in range(u)]
    keep = sorted(keep)
    keys = k[1:]
    rows = []
    for i in keep:
        sims = sorted(((float(keys[i] @ keys[j] / (keys[i].norm() * keys[j].norm())), j) for j in range(n) if j != i),
                      key=lambda s: -s[0])
        rows.append(feats[i] + sum(a[j] * feats[j] for _, j in sims[:knn]))
    rows.append(sum(a[j] * feats[j] for j in range(n) if j not in keep))
    return torch.stack(rows), len(outliers)


def test_prumerge_adaptive_matches_reference_and_reports_counts(tower64):
    from compress.baselines.prumerge import prumerge

    pv = _pixels(3, 64, seed=11)
    out = prumerge(tower64, pv)
    refs = [_ref_prumerge(tower64, pv[i]) for i in range(3)]
    assert any(n_out > 1 for _, n_out in refs)  # the planted outliers make the test meaningful
    assert out.counts.tolist() == [max(1, n_out) + 1 for _, n_out in refs]
    assert out.mean_kept == pytest.approx(sum(max(1, n_out) + 1 for _, n_out in refs) / 3)
    for b, (ref, _) in enumerate(refs):
        assert _close(out.features[b, : len(ref)], ref)
        assert not out.features[b, len(ref):].any()  # zero padding after the count
        assert _close(prumerge(tower64, pv[b:b + 1]).features[0], ref)  # batch == one at a time


def test_prumerge_fixed_and_plus_budgets_match_reference(tower64):
    from compress.baselines.prumerge import prumerge, prumerge_plus

    pv = _pixels(2, 64, seed=5)
    for k in (2, 20, 48):
        plus = prumerge_plus(tower64, pv, k)
        fixed = prumerge(tower64, pv, k)
        assert plus.shape == (2, k, 64) and fixed.counts.tolist() == [k, k]
        for b in range(2):
            assert _close(plus[b], _ref_prumerge(tower64, pv[b], k, plus=True)[0])
            assert _close(fixed.features[b], _ref_prumerge(tower64, pv[b], k)[0])
        assert _close(plus, torch.cat([prumerge_plus(tower64, pv[i:i + 1], k) for i in range(2)]))


def test_prumerge_wavg_is_a_convex_combination(tower64):
    from compress.baselines.prumerge import prumerge_plus

    pv = _pixels(1, 64)
    hs = _hidden(tower64, pv)[-2][0, 1:]
    out = prumerge_plus(tower64, pv, 10, merge="wavg")[0]
    lo, hi = hs.min(0).values - 1e-5, hs.max(0).values + 1e-5
    assert bool(((out >= lo) & (out <= hi)).all())


def test_prumerge_refuses_llava_next(tower64):
    from compress.baselines.prumerge import prumerge, prumerge_plus

    with pytest.raises(ValueError, match="LLaVA-1.5"):
        prumerge(tower64, torch.zeros(1, 5, 3, 64, 64))
    with pytest.raises(ValueError, match="LLaVA-1.5"):
        prumerge_plus(tower64, _pixels(1, 64), 10, family="llava_next")
    with pytest.raises(ValueError):
        prumerge_plus(tower64, _pixels(1, 64), None)


# ---------------------------------------------------------------------------------------------- VisionZip


def _ref_visionzip(eager, image, dominant, contextual, merge="mean"):
    """Slow VisionZip on one image from the tower's own eager attention maps (feature layer -2, layer 0)."""
    with torch.no_grad():
        out = eager(pixel_values=image[None], output_hidden_states=True, output_attentions=True)
        layer = eager.encoder.layers[0]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[0]))[0].double()
    feats = out.hidden_states[-2][0].double()
    heads, n = layer.self_attn.num_heads, feats.shape[0] - 1
    a = [float(sum(out.attentions[0][0, hd, 0, 1 + i] for hd in range(heads))) for i in range(n)]
    metric = [sum(keys[p].view(heads, -1)[hd] for hd in range(heads)) / heads for p in range(n + 1)]
    dom = [0] + sorted(1 + i for i in sorted(range(n), key=lambda i: -a[i])[: dominant - 1])
    rest = [p for p in range(1, n + 1) if p not in dom]
    step = max(1, len(rest) // contextual)
    targets = [rest[j] for j in range(0, len(rest), step)][:contextual]
    groups = {t: [] for t in targets}
    for p in rest:
        if p in groups:
            continue
        cos = [float(metric[p] @ metric[t] / (metric[p].norm() * metric[t].norm())) for t in targets]
        groups[targets[cos.index(max(cos))]].append(p)
    rows = [feats[p] for p in dom]
    for t in targets:
        g = groups[t]
        if merge == "mean":
            rows.append((feats[t] + sum((feats[p] for p in g), torch.zeros_like(feats[t]))) / (1 + len(g)))
        else:
            rows.append(feats[t] + (sum(feats[p] for p in g) / len(g) if g else 0))
    return torch.stack(rows), dom, targets


@pytest.fixture(scope="module")
def eager64(tower64):
    m = copy.deepcopy(tower64)
    m.set_attn_implementation("eager")
    return m


@pytest.mark.parametrize("num_keep,merge", [(12, "mean"), (30, "official"), (64, "mean")])
def test_visionzip_matches_reference(tower64, eager64, num_keep, merge):
    from compress.baselines.visionzip import visionzip, visionzip_split

    pv = _pixels(2, 64, seed=num_keep)
    d, c = visionzip_split(num_keep)
    assert (d, c) == (num_keep - round(num_keep * 10 / 64), round(num_keep * 10 / 64))
    out = visionzip(tower64, pv, num_keep, merge=merge)
    assert out.shape == (2, num_keep, 64)
    for b in range(2):
        ref, dom, targets = _ref_visionzip(eager64, pv[b], d, c, merge)
        assert len(dom) + len(targets) == num_keep
        assert _close(out[b], ref, tol=1e-4)
        assert _close(visionzip(tower64, pv[b:b + 1], num_keep, merge=merge)[0], ref, tol=1e-4)


def test_visionzip_published_split_and_options(tower64):
    from compress.baselines.visionzip import visionzip, visionzip_split

    assert [visionzip_split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    pv = _pixels(1, 64)
    hs = _hidden(tower64, pv)
    no_cls = visionzip(tower64, pv, 10, keep_cls=False, dominant=10, contextual=0)
    assert no_cls.shape == (1, 10, 64) and not any(torch.equal(r, hs[-2][0, 0]) for r in no_cls[0])
    with_cls = visionzip(tower64, pv, 10, dominant=10, contextual=0)
    assert torch.equal(with_cls[0, 0], hs[-2][0, 0])  # official: [CLS] is the first dominant token
    with pytest.raises(ValueError):
        visionzip(tower64, pv, 10, dominant=5, contextual=6)
    with pytest.raises(ValueError):
        visionzip(tower64, pv, 66)


def test_allocate_crop_budget():
    from compress.baselines.visionzip import allocate_crop_budget

    assert allocate_crop_budget(64, 5) == [13, 13, 13, 13, 12]
    assert allocate_crop_budget(3, 5) == [1, 1, 1, 0, 0]
    assert allocate_crop_budget(10, 3, weights=[2, 1, 1]) == [5, 3, 2]
    for total, k in itertools.product(range(0, 40, 7), range(1, 6)):
        shares = allocate_crop_budget(total, k)
        assert sum(shares) == total and max(shares) - min(shares) <= 1


def test_visionzip_llava_next_whole_image_budget(tower64):
    from compress.baselines.visionzip import allocate_crop_budget, visionzip, visionzip_split

    pv = torch.randn(2, 3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    crops = [3, 2]
    out = visionzip(tower64, pv, 40, crops_per_image=crops)
    assert out.shape == (2, 40, 64)
    d, c = visionzip_split(40)
    for b, k in enumerate(crops):
        parts = [visionzip(tower64, pv[b, i:i + 1], di + ci, dominant=di, contextual=ci, keep_cls=di > 0)[0]
                 for i, (di, ci) in enumerate(zip(allocate_crop_budget(d, k), allocate_crop_budget(c, k)))]
        assert _close(out[b], torch.cat(parts))
    as_list = visionzip(tower64, [pv[0, :3], pv[1, :2]], 40)
    assert _close(as_list, out)


def test_registry_names():
    from compress.baselines.vision import VISION_REDUCERS, feature_list
    from compress.baselines.prumerge import AdaptiveFeatures

    assert set(VISION_REDUCERS) == {"tome", "prumerge", "prumerge_plus", "visionzip"}
    f = AdaptiveFeatures(torch.arange(12.0).view(2, 3, 2), torch.tensor([3, 1]))
    assert [t.shape[0] for t in feature_list(f)] == [3, 1]
