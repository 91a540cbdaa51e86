"""`metacompress analyze compressor` end to end on a tiny LLaVA and MT-Shapes scenes: the reported matrix statistics
are those of P recomputed here, the object-mass shares match the scene's patch labels, KL per turn is reported."""

import argparse
import json

import pytest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    from compress.metacompress import MetaCompress
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate
    from tests.tiny_models import save_tiny

    root = tmp_path_factory.mktemp("compressor")
    model = save_tiny(root / "llava", "llava")
    generate(root / "data", 2, seed=3, cfg=MTShapesConfig(image_size=32), val=0, test=0, progress=False)
    torch.manual_seed(5)
    hidden = json.loads((model / "config.json").read_text())["text_config"]["hidden_size"]
    # as the train stage saves one: compute_dtype recorded, here with the locality term too
    compressor = MetaCompress(hidden, compress_dim=16, reference_grid=(8, 8), generator="normed", locality=1.0)
    compressor.config["compute_dtype"] = "float32"
    compressor.save_pretrained(root / "comp")
    (root / "comp" / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 2.0 / s, "kl": 1.0 / s, "entropy": 0.5, "collapse": 1.0}) + "\n"
                for s in (1, 2, 3)))
    return model, root / "data" / "train" / "dialogues.jsonl", root


def _run(argv):
    from pipeline.commands import analyze

    parser = argparse.ArgumentParser()
    analyze.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_analyze_compressor_end_to_end(setup):
    import numpy as np
    import torch

    from compress.analysis import matrix_statistics
    from compress.lvlm import load_adapter
    from compress.metacompress import MetaCompress
    from infra.reference.targets import scenes_for
    from pipeline.datasets.mt_shapes import patch_labels
    from pipeline.dialogues import load_dialogues

    model, dialogues, root = setup
    out = root / "out"
    assert _run(["analyze", "compressor", "--model", str(model), "--compressor", str(root / "comp"),
                 "--dialogues", str(dialogues), "--rate", "0.75", "--n", "2", "--oracle-steps", "2",
                 "--max-new-tokens", "3", "--topk", "8", "--out", str(out)]) == 0
    for name in ("compressor_analysis.json", "compressor_analysis.md", "compressor_matrices.jsonl",
                 "row_entropy.png", "column_share.png", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "compressor_analysis.json").read_text())
    records = [json.loads(line) for line in (out / "compressor_matrices.jsonl").read_text().splitlines()]
    assert set(summary["methods"]) == {"metacompress", "sample", "oracle"}
    assert summary["curves"]["steps"] == 3 and summary["curves"]["last"]["kl"] == pytest.approx(1 / 3)

    # recompute P and its statistics here, and the object masks from the scene
    adapter = load_adapter(model)
    comp = MetaCompress.from_pretrained(root / "comp")
    scenes = scenes_for(dialogues)
    for d, r in zip(load_dialogues(dialogues), records):
        with torch.no_grad():
            enc = adapter.features(adapter.prepare(d.image))
            p = comp(enc.tokens, 16, enc.layout).matrix
        objects = patch_labels(scenes[d.meta.get("scene_id", d.dialogue_id)], 8, 8)["object"].reshape(-1)
        ref = matrix_statistics(p, 3, torch.from_numpy(objects >= 0), layout=enc.layout)
        got = r["matrices"]["trained"]
        for key in ("row_entropy", "effective_tokens", "effective_columns", "row_spread", "window_mass",
                    "near_mass", "rectangle_mass", "mask_mass", "mask_area"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
        assert got["mask_area"] == pytest.approx(float(np.mean(objects >= 0)))
        assert 0.0 <= got["oracle_column_tv"] <= 1.0 and 0.0 <= got["oracle_row_tv"] <= 1.0
        assert set(r["matrices"]) == {"trained", "init", "oracle"}
    assert summary["matrices"]["trained"]["row_entropy"] == pytest.approx(
        np.mean([r["matrices"]["trained"]["row_entropy"] for r in records]))
    md = (out / "compressor_analysis.md").read_text()
    assert "row entropy (nats)" in md and "KL_1" in md and "Oracle (per-image P)" in md


def test_analyze_compressor_bad_input(setup):
    model, dialogues, root = setup
    base = ["analyze", "compressor", "--model", str(model), "--compressor", str(root / "comp"),
            "--dialogues", str(dialogues), "--out", str(root / "bad")]
    with pytest.raises(ValueError, match="--rate"):
        _run(base + ["--rate", "0"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        _run([*base[:5], str(root), *base[6:], "--rate", "0.5"])
    bad_log = root / "bad.jsonl"
    bad_log.write_text('{"loss": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: no 'step'"):
        _run(base + ["--rate", "0.5", "--curves", str(bad_log)])
