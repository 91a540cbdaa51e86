"""`metacompress bench scale`: the 7B shapes it simulates, and one small run's JSON line (no timed assertions)."""

import json

from pipeline.commands.bench_scale import arch_shapes


def test_shapes_are_the_7b_models():
    one = arch_shapes("llava-1.5-7b")  # CLIP-L/14 at 336: 24 x 24 patches of width 1024; Vicuna-7B width 4096
    assert (one.crops, one.tokens_per_crop, one.vision_dim, one.post_tokens, one.text_dim) == (1, 576, 1024, 576, 4096)
    nxt = arch_shapes("llava-next-7b")  # 672 x 672: base + 2 x 2 tiles; 576 + 48 x 48 + 48 newlines after projection
    assert (nxt.crops, nxt.tokens_per_crop, nxt.post_tokens, nxt.grid) == (5, 576, 576 + 48 * 48 + 48, (48, 48))


def test_a_small_run_ends_with_the_json_figures(tmp_path, capsys):
    from pipeline.commands.cli import build_parser

    args = build_parser().parse_args(
        ["bench", "scale", "--arch", "llava-1.5-7b", "--images", "6", "--dialogues-per-image", "2",
         "--images-per-shard", "2", "--micro-batch", "2", "--train-steps", "3", "--preprocess-ms", "0",
         "--tower-ms", "1", "--step-ms", "1", "--work-dir", str(tmp_path / "w"), "--json"])
    args.func(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    raw = 576 * 1024 * 2  # one bfloat16 tower output per image, stored once for its 2 dialogues
    assert 0.5 * raw < result["feature_bytes_per_image"] <= 1.01 * raw
    assert 3 * 8 * 64 * (2 + 4) * 0.3 < result["teacher_bytes_per_dialogue"]  # top-64 of 24 tokens, zstd
    for key in ("actor_busy_share", "data_wait_share"):
        assert 0 <= result[key] <= 1
    assert result["noop_rerun_s"] >= 0 and result["shards"] == 3 + 3
