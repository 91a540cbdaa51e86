"""Shard store: round trips, atomic publish, validation, resume bookkeeping, refusal, overwrite, errors, zero-copy."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import shards, tensor_columns
from pipeline.hashing import config_hash
from pipeline.shards import CorruptShard, IncompatibleOutput, StageOutput, bytes_per_answer_token, iter_webdataset
from pipeline.tensor_columns import arrow_to_features, features_to_arrow, teacher_targets

FORMATS = ["parquet", "webdataset", "arrow"]


def feature_records(seed: int, sizes=(5, 0, 17, 3), d: int = 8) -> list[dict]:
    """Ragged float16 features with extreme values (inf, nan payloads, subnormals) that must survive bit-exactly."""
    rng = np.random.default_rng(seed)
    recs = []
    for j, n in enumerate(sizes):
        bits = rng.integers(0, 2**16, size=(n, d), dtype=np.uint16)  # every float16 bit pattern is allowed
        recs.append({"sample_id": f"img{seed}-{j}", "n_tokens": n, "layout": {"h": n, "w": 1},
                     "x_img": bits.view(np.float16)})
    return recs


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def teacher_record(rng, turns, k=64, vocab=32000) -> dict:
    """Top-k of a real log-softmax: ids distinct per position, logprobs descending, tail = log(1 - sum p_topk)."""
    lps, ids, tails = [], [], []
    for t in turns:
        logits = rng.standard_normal((t, vocab)).astype(np.float32) * 3
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        idx = np.argpartition(-logp, k - 1, -1)[:, :k]
        idx = np.take_along_axis(idx, np.argsort(-np.take_along_axis(logp, idx, -1), -1), -1)  # descending
        top = np.take_along_axis(logp, idx, -1)
        lps.append(top)
        ids.append(idx)
        tails.append(np.log1p(-np.exp(top).sum(-1)))
    return teacher_targets(lps, ids, tails)


def out(tmp_path, fmt="parquet", chash="c1", ihash="i1", name="out", **kw) -> StageOutput:
    return StageOutput(str(tmp_path / name), "extract", chash, ihash, fmt, **kw)


def test_config_hash_is_sha256_of_canonical_json():
    expected = hashlib.sha256(b'{"a":[1,2],"b":{"c":"\xc3\xa9","d":1.5}}').hexdigest()
    assert config_hash({"b": {"d": 1.5, "c": "é"}, "a": (1, 2)}) == expected
    assert config_hash({"a": 1}) != config_hash({"a": 2})


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_bit_exact(tmp_path, fmt):
    o = out(tmp_path, fmt)
    o.prepare({"model": "tiny"})
    recs = feature_records(0)
    side = o.write_shard(0, recs)
    assert side["rows"] == len(recs)
    back = o.read_records(0)
    assert [r["sample_id"] for r in back] == [r["sample_id"] for r in recs]
    for r, q in zip(back, recs):
        assert same_bits(r["x_img"], q["x_img"])
        assert r["n_tokens"] == q["n_tokens"] and r["layout"] == q["layout"]
    table = o.read_shard(0)
    assert table.schema.field("x_img").type == pa.list_(pa.list_(pa.float16(), 8))
    again = out(tmp_path, fmt, name="again")  # deterministic bytes: a recomputed shard equals the first one
    again.write_shard(0, feature_records(0))
    assert (tmp_path / "again" / o.shard_name(0)).read_bytes() == (tmp_path / "out" / o.shard_name(0)).read_bytes()
    # teacher targets: per-turn ragged lists, nested one level deeper
    rng = np.random.default_rng(1)
    trecs = [{"dialogue_id": f"d{j}", **teacher_record(rng, turns, k=4, vocab=50)}
             for j, turns in enumerate([(3, 0, 2), (), (1,)])]
    o.write_shard(1, trecs)
    for r, q in zip(o.read_records(1), trecs):
        for c in tensor_columns.TEACHER_COLUMNS:
            assert len(r[c]) == len(q[c]) and all(same_bits(a, b) for a, b in zip(r[c], q[c]))


def test_bfloat16_stored_as_uint16_bits(tmp_path):
    torch = pytest.importorskip("torch")
    xs = [torch.randn(n, 6).to(torch.bfloat16) for n in (4, 1)]
    for fmt in ("parquet", "webdataset"):
        o = out(tmp_path, fmt, name=fmt)
        o.write_shard(0, [{"sample_id": f"s{j}", "x": x} for j, x in enumerate(xs)])
        table = o.read_shard(0)
        assert table.schema.field("x").metadata[tensor_columns.TAG] == b"bfloat16"
        for r, x in zip(o.read_records(0), xs):
            assert r["x"].dtype == np.uint16
            assert torch.equal(tensor_columns.bf16_to_torch(r["x"]), x)
            assert r["x"].tobytes() == x.view(torch.int16).numpy().tobytes()


def test_atomic_publish_crash_between_write_and_rename(tmp_path, monkeypatch):
    o = out(tmp_path)
    recs = feature_records(2)
    final = tmp_path / "out" / o.shard_name(0)
    real = StageOutput._publish

    def crash(self, tmp, dest):
        if dest.endswith(".parquet"):
            assert not os.path.exists(dest), "final name visible before rename"
            with open(tmp, "rb") as f:  # the temporary file is complete, only its publication is missing
                back = tensor_columns.table_to_records(pq.read_table(f))
            assert all(same_bits(b["x_img"], r["x_img"]) for b, r in zip(back, recs)) and len(back) == len(recs)
            raise KeyboardInterrupt("killed between write and rename")
        real(self, tmp, dest)

    monkeypatch.setattr(StageOutput, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        o.write_shard(0, recs)
    assert not final.exists() and not o.is_valid(0) and o.missing_shards(1) == [0]
    monkeypatch.setattr(StageOutput, "_publish", real)
    o.write_shard(0, recs)
    assert o.missing_shards(1) == []

    # crash after the shard is published but before its sidecar: the unverified shard is recomputed
    o2 = out(tmp_path, name="out2")
    calls = []

    def crash_sidecar(self, tmp, dest):
        calls.append(dest)
        if dest.endswith(".parquet.json"):
            raise KeyboardInterrupt
        real(self, tmp, dest)

    o2.prepare()
    monkeypatch.setattr(StageOutput, "_publish", crash_sidecar)
    with pytest.raises(KeyboardInterrupt):
        o2.write_shard(0, recs)
    assert (tmp_path / "out2" / o2.shard_name(0)).exists() and o2.missing_shards(1) == [0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_sidecar_catches_truncation_flip_and_row_lie(tmp_path, fmt):
    o = out(tmp_path, fmt)
    for i in range(3):
        o.write_shard(i, feature_records(i))
    root = tmp_path / "out"
    data = (root / o.shard_name(0)).read_bytes()
    (root / o.shard_name(0)).write_bytes(data[: len(data) - 7])
    data = bytearray((root / o.shard_name(1)).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / o.shard_name(1)).write_bytes(bytes(data))
    side = json.loads((root / (o.shard_name(2) + ".json")).read_text())
    (root / (o.shard_name(2) + ".json")).write_text(json.dumps({**side, "rows": side["rows"] + 1}))
    assert [o.is_valid(i) for i in range(3)] == [False, False, False]
    with pytest.raises(CorruptShard, match="truncated or altered"):
        o.read_shard(1)
    with pytest.raises(CorruptShard, match="rows"):
        o.read_shard(2)


def test_missing_shards_exactly_missing_and_corrupt_and_resume_is_byte_identical(tmp_path):
    n = 7
    ref = out(tmp_path, name="ref")
    for i in range(n):
        ref.write_shard(i, feature_records(i))
    ref.finish(n)

    o = out(tmp_path)
    for i in range(6):
        o.write_shard(i, feature_records(i))
    root = tmp_path / "out"
    (root / o.shard_name(1)).unlink()
    (root / o.shard_name(3)).write_bytes((root / o.shard_name(3)).read_bytes()[:100])
    data = bytearray((root / o.shard_name(4)).read_bytes())
    data[-20] ^= 0xFF
    (root / o.shard_name(4)).write_bytes(bytes(data))
    (root / (o.shard_name(5) + ".json")).unlink()
    # without verify, sizes and sidecars only: the flipped byte of shard 4 (same size) is left to its reader
    assert o.missing_shards(n) == [1, 3, 5, 6]
    with pytest.raises(CorruptShard, match="truncated or altered"):
        o.read_shard(4)
    assert o.missing_shards(n, verify=True) == [1, 3, 4, 5, 6]
    assert out(tmp_path, verify=True).missing_shards(n) == [1, 3, 4, 5, 6]  # `run --verify`
    with pytest.raises(CorruptShard, match=r"\[1, 3, 4, 5, 6\]"):
        o.finish(n, verify=True)
    assert not o.is_complete()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        shards.read_completed(str(root))
    before = {i: (root / o.shard_name(i)).stat().st_mtime_ns for i in (0, 2)}
    for i in o.missing_shards(n, verify=True):
        o.write_shard(i, feature_records(i))
    manifest = o.finish(n)
    assert o.is_complete(deep=True) and o.missing_shards(n) == []
    assert shards.read_completed(str(root)) == manifest and manifest["config_hash"] == "c1"
    assert {i: (root / o.shard_name(i)).stat().st_mtime_ns for i in (0, 2)} == before  # valid ones untouched
    for i in range(n):  # the repaired output equals an uninterrupted run, byte for byte
        assert (root / o.shard_name(i)).read_bytes() == (tmp_path / "ref" / ref.shard_name(i)).read_bytes()
    assert manifest["rows"] == sum(len(feature_records(i)) for i in range(n))
    assert [s["sha256"] for s in manifest["shards"]] == [
        hashlib.sha256((root / o.shard_name(i)).read_bytes()).hexdigest() for i in range(n)]
    # repairing a finished stage takes its _SUCCESS away until finish() runs again
    (root / o.shard_name(2)).write_bytes(b"garbage")
    o.write_shard(2, feature_records(2))
    assert not o.is_complete() and (o.finish(n) and o.is_complete(deep=True))


def test_parquet_stores_2d_tensor_columns_as_packed_bytes(tmp_path):
    recs = feature_records(3)  # ragged, with an empty (0, d) array
    table = tensor_columns.records_to_table(recs)
    for part, expected in [(table, recs), (table.slice(1, 2), recs[1:3]),
                           (pa.concat_tables([table.slice(0, 2), table.slice(2)]), recs)]:
        packed = tensor_columns.pack_tensor_columns(part)
        assert packed.schema.field("x_img").type == pa.large_binary()
        assert [len(b) for b in packed.column("x_img").to_pylist()] == [r["x_img"].nbytes for r in expected]
        back = tensor_columns.table_to_records(packed)
        assert all(same_bits(b["x_img"], r["x_img"]) for b, r in zip(back, expected))
    o = out(tmp_path)
    o.write_shard(0, recs)
    stored = pq.read_table(tmp_path / "out" / o.shard_name(0))
    assert stored.schema.field("x_img").type == pa.large_binary()
    assert b"".join(stored.column("x_img").to_pylist()) == b"".join(r["x_img"].tobytes() for r in recs)
    old = tmp_path / "old.parquet"  # a shard written before packing still reads
    pq.write_table(table, old)
    assert all(same_bits(b["x_img"], r["x_img"]) for b, r in zip(
        tensor_columns.table_to_records(pq.read_table(old)), recs))


class _CountingFS:
    """A LocalFileSystem that counts the bytes of every file opened for reading (each opened file is read whole
    or not at all by the shard store), by name."""

    def __init__(self):
        self.fs, self.opened = pafs.LocalFileSystem(), []

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def _count(self, path):
        self.opened.append((os.path.basename(path), os.path.getsize(path)))

    def open_input_file(self, path):
        self._count(path)
        return self.fs.open_input_file(path)

    def open_input_stream(self, path):
        self._count(path)
        return self.fs.open_input_stream(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_finished_stage_is_recognised_without_reading_shard_bytes(tmp_path, fmt):
    n = 6
    rng = np.random.default_rng(0)  # random values: nothing for zstd to squeeze
    big = [{"sample_id": f"s{i}-{j}", "x_img": rng.standard_normal((400, 64)).astype(np.float16)}
           for i in range(n) for j in range(2)]
    o = out(tmp_path, fmt)
    for i in range(n):
        o.write_shard(i, big[2 * i:2 * i + 2])
    o.finish(n)
    shard_bytes = sum(os.path.getsize(tmp_path / "out" / o.shard_name(i)) for i in range(n))
    counting = _CountingFS()
    rerun = StageOutput(str(tmp_path / "out"), "extract", "c1", "i1", fmt, filesystem=counting)
    assert rerun.missing_shards(n) == [] and rerun.finish(n)["rows"] == 2 * n and rerun.is_complete()
    shard_names = {rerun.shard_name(i) for i in range(n)}
    assert not [name for name, _ in counting.opened if name in shard_names]
    assert sum(size for _, size in counting.opened) < shard_bytes / 20  # sidecars, manifest, _SUCCESS only
    # the reader checks the content it reads: a flipped byte (same size) is caught at use, and by verify
    path = tmp_path / "out" / o.shard_name(3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    assert rerun.missing_shards(n) == [] and rerun.missing_shards(n, verify=True) == [3]
    assert not rerun.is_complete(deep=True)
    with pytest.raises(CorruptShard, match="part-00003.*truncated or altered"):
        rerun.read_records(3)
    counting.opened.clear()
    rerun.read_records(2)
    assert [name for name, _ in counting.opened] == [rerun.shard_name(2) + ".json", rerun.shard_name(2)]
    # a finished stage's lost sidecar or truncated shard is found from the listing alone
    (tmp_path / "out" / (o.shard_name(5) + ".json")).unlink()
    path = tmp_path / "out" / o.shard_name(1)
    path.write_bytes(path.read_bytes()[:-1])
    counting.opened.clear()
    assert rerun.missing_shards(n) == [1, 5]
    assert not [name for name, _ in counting.opened if name.startswith("part-")]


def test_incompatible_output_is_refused(tmp_path):
    o = out(tmp_path, chash="aaaa")
    o.prepare({"model": "a"})
    o.write_shard(0, feature_records(0))
    path = str(tmp_path / "out")
    for kw, found, expected in [(dict(chash="bbbb"), "aaaa", "bbbb"), (dict(chash="aaaa", ihash="i2"), "i1", "i2"),
                                (dict(chash="aaaa", fmt="webdataset"), "parquet", "webdataset")]:
        other = out(tmp_path, **kw)
        with pytest.raises(IncompatibleOutput) as e:
            other.prepare()
        msg = str(e.value)
        assert path in msg and found in msg and expected in msg
        assert "use a new output directory or pass overwrite" in msg
    worker = out(tmp_path, chash="bbbb")  # a worker that skipped prepare() is refused too
    with pytest.raises(IncompatibleOutput, match="bbbb"):
        worker.write_shard(1, feature_records(1))
    assert out(tmp_path, chash="aaaa").missing_shards(2) == [1]  # nothing was touched
    # sidecars are checked even without _config.json
    (tmp_path / "out" / "_config.json").unlink()
    with pytest.raises(IncompatibleOutput, match="part-00000.parquet.json"):
        out(tmp_path, chash="bbbb").check_compatible()


def test_overwrite_removes_old_outputs_explicitly(tmp_path):
    o = out(tmp_path, chash="old")
    for i in range(2):
        o.write_shard(i, feature_records(i))
    o.finish(2)
    o.record_error("img9", "corrupt image")
    root = tmp_path / "out"
    (root / "notes.txt").write_text("not ours")
    new = out(tmp_path, chash="new")
    with pytest.raises(IncompatibleOutput):
        new.prepare()
    removed = new.prepare({"model": "b"}, overwrite=True)
    assert sorted(removed) == sorted(["part-00000.parquet", "part-00000.parquet.json", "part-00001.parquet",
                                      "part-00001.parquet.json", "_manifest.json", "_SUCCESS", "_errors.jsonl",
                                      "_config.json"])
    assert sorted(os.listdir(root)) == ["_config.json", "notes.txt"]
    assert json.loads((root / "_config.json").read_text())["config"] == {"model": "b"}
    new.write_shard(0, feature_records(5))
    assert new.missing_shards(2) == [1] and new.errors() == []
    # without overwrite, a valid shard is never replaced by different bytes; identical bytes are a no-op
    with pytest.raises(FileExistsError, match="refusing to replace"):
        new.write_shard(0, feature_records(6))
    mtime = (root / new.shard_name(0)).stat().st_mtime_ns
    new.write_shard(0, feature_records(5))
    assert (root / new.shard_name(0)).stat().st_mtime_ns == mtime


def _append_errors(path: str, tag: int) -> None:
    o = StageOutput(path, "extract", "c1", "i1")
    for j in range(40):
        o.record_error(f"{tag}-{j}", "x" * 300, shard=tag)


def test_errors_jsonl_appends_safely(tmp_path):
    path = str(tmp_path / "out")
    o = StageOutput(path, "extract", "c1", "i1")
    o.record_error("img1", "missing image file a.jpg")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_errors, args=(path, t)) for t in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 3 * 40
    rows = [json.loads(ln) for ln in lines]  # no interleaved partial lines
    assert rows[0] == {"stage": "extract", "record_id": "img1", "reason": "missing image file a.jpg"}
    assert {r["record_id"] for r in rows[1:]} == {f"{t}-{j}" for t in range(3) for j in range(40)}
    o.record_error("img1", "missing image file a.jpg")  # a re-run meets the same bad record again
    assert len(o.errors()) == 1 + 3 * 40
    # filesystems without a local append go through a rewrite
    mem = StageOutput("root", "teacher", "c1", "i1", filesystem=pafs._MockFileSystem())
    mem.record_error("d1", "empty question")
    mem.record_error("d2", "empty question")
    assert [e["record_id"] for e in mem.errors()] == ["d1", "d2"]


def test_zero_copy_reads(tmp_path):
    xs = [r["x_img"] for r in feature_records(3, sizes=(40, 7, 0, 25), d=16)]
    # in memory: the views are slices of the one Arrow value buffer
    arr = features_to_arrow(xs)
    views = arrow_to_features(arr)
    buf = np.asarray(arr.values.values.to_numpy(zero_copy_only=True))
    assert all(np.shares_memory(v, buf) for v in views if v.size)
    # Arrow IPC on local disk: the views point into the memory-mapped shard file itself
    o = out(tmp_path, "arrow")
    o.write_shard(0, [{"sample_id": str(j), "x_img": x} for j, x in enumerate(xs)])
    table = o.read_shard(0)
    views = arrow_to_features(table.column("x_img"))
    assert all(same_bits(v, x) for v, x in zip(views, xs))
    assert all(not v.flags.owndata and not v.flags.writeable for v in views)
    shard = str(tmp_path / "out" / o.shard_name(0))
    maps = [ln.split() for ln in open("/proc/self/maps") if ln.rstrip().endswith(shard)]
    ranges = [tuple(int(a, 16) for a in m[0].split("-")) for m in maps]
    assert ranges, "shard file is not memory-mapped"
    for v in views:
        if v.size:
            addr = v.__array_interface__["data"][0]
            assert any(lo <= addr and addr + v.nbytes <= hi for lo, hi in ranges)


def test_teacher_bytes_per_answer_token_at_k64(tmp_path):
    rng = np.random.default_rng(4)
    turns = [(12, 30, 7), (25,), (3, 18, 40, 9)] * 3
    recs = [{"dialogue_id": f"d{j}", "answer_ids": [np.arange(t, dtype=np.int32) for t in ts],
             **teacher_record(rng, ts)} for j, ts in enumerate(turns)]
    o = StageOutput(str(tmp_path / "teacher"), "teacher", "c1", "i1")
    o.write_shard(0, recs[:5])
    o.write_shard(1, recs[5:])
    size = sum(os.path.getsize(tmp_path / "teacher" / o.shard_name(i)) for i in range(2))
    tokens = sum(sum(ts) for ts in turns)
    bpt = bytes_per_answer_token(o, 2)
    assert bpt == pytest.approx(size / tokens) and bpt <= 400
    back = o.read_records(0) + o.read_records(1)
    for r, q in zip(back, recs):
        for lp, ids, tail, lq in zip(r["topk_logprobs"], r["topk_ids"], r["tail_logmass"], q["topk_logprobs"]):
            assert lp.shape[1] == 64 and ids.dtype == np.int32 and tail.dtype == np.float32 and same_bits(lp, lq)
            # the stored top-k mass plus the stored tail mass is the whole distribution
            np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(-1) + np.exp(tail), 1.0, rtol=2e-3)


def test_webdataset_streaming_and_other_filesystems(tmp_path):
    o = StageOutput((tmp_path / "wds").as_uri(), "extract", "c1", "i1", "webdataset")  # a file:// URI
    shards_in = {i: feature_records(10 + i) for i in range(2)}
    for i, recs in shards_in.items():
        o.write_shard(i, recs)
    streamed = list(iter_webdataset([o.shard_uri(i) for i in range(2)]))
    expected = [r for i in range(2) for r in shards_in[i]]
    assert [s["sample_id"] for s in streamed] == [r["sample_id"] for r in expected]
    assert all(same_bits(s["x_img"], r["x_img"]) for s, r in zip(streamed, expected))
    assert len({s["__key__"] for s in streamed}) == len(expected)
    # the same tar files read by the webdataset library
    wds = pytest.importorskip("webdataset")
    from safetensors.numpy import load
    files = [str(tmp_path / "wds" / o.shard_name(i)) for i in range(2)]
    got = list(wds.WebDataset(files, shardshuffle=False, empty_check=False))
    assert [json.loads(g["json"])["sample_id"] for g in got] == [r["sample_id"] for r in expected]
    assert all(same_bits(load(g["safetensors"])["x_img"], r["x_img"]) for g, r in zip(got, expected))
    # a SubTree filesystem (how s3://bucket/prefix resolves) behaves like a local path
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    s = StageOutput("sub/out", "extract", "c1", "i1", filesystem=sub)
    s.write_shard(0, feature_records(0))
    s.finish(1)
    assert s.is_complete(deep=True) and (tmp_path / "sub" / "out" / "_SUCCESS").exists()


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="record 1 has keys"):
        tensor_columns.records_to_table([{"a": 1, "x": np.zeros((1, 2), np.float16)}, {"a": 2}])
    with pytest.raises(ValueError, match="array 1 has dtype float16 shape \\(2, 3\\)"):
        features_to_arrow([np.zeros((1, 2), np.float16), np.zeros((2, 3), np.float16)])
    with pytest.raises(ValueError, match="turn 0"):
        teacher_targets([np.zeros((3, 4))], [np.zeros((2, 4), np.int64)], [np.zeros(3)])
    with pytest.raises(ValueError, match="unknown shard format 'zarr'"):
        out(tmp_path, "zarr")
    with pytest.raises(ValueError, match="WebDataset key 'a.b'"):
        out(tmp_path, "webdataset").write_shard(0, [{"__key__": "a.b", "x": np.zeros((1, 2), np.float16)}])
