"""The recipe (the shipped optimizer, each generator) lowers the held-out KL on a tiny LLaVA: the
compressor's own loop (student, client optimizer, clipping as configured), in process, on cached MT-Shapes
targets; held-out = the test split, never trained on."""

import pytest

from tests.test_train import RATE, build_cache, make_config


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate
    from tests.tiny_models import save_tiny

    root = tmp_path_factory.mktemp("recipe")
    generate(root / "data", total=24, seed=0, cfg=MTShapesConfig(image_size=32), val=0, test=8, progress=False)
    save_tiny(root / "model", "llava", num_layers=2)
    config = make_config(root, "w")
    build_cache(config, "train")
    build_cache(config, "test")
    return root


def _heldout_kl(student, source, keys) -> float:
    import torch

    with torch.no_grad():
        return float(student(source.examples(keys), RATE)["kl"])


@pytest.mark.parametrize("generator,clip_mode,weight,prior,margin",
                         [("paper", "norm", 1.0, 0.0, 0.02), ("normed", "value", 0.1, 0.0, 0.02),
                          ("paper", "norm", 0.1, 10.0, 0.005), ("paper", "norm", 0.0, 10.0, 0.005)])
def test_recipe_lowers_heldout_kl(cached, generator, clip_mode, weight, prior, margin):
    """The shipped optimizer (AdamW; lr 0.01 for a 40-step run) with the default generator and regularisers, the
    normed generator with value clipping and weights 0.1 (at weight 1 its regularisers outweigh the tiny model's KL:
    held-out KL 0.805 -> 0.82-0.85 measured), and the shipped configs' Spatial prior with their candidates' weights
    0.1: it starts at Spatial's KL, already below the paper's start (0.757 against 0.879), and the gain is over
    Spatial (measured 0.757 -> 0.746; the pass is deterministic, so an untrained gate would leave it equal); the same
    with the third candidate's weights 0, the KL alone moving P off Spatial's start (measured 0.757 -> 0.736)."""
    import torch

    from compress.lvlm import load_adapter
    from infra.deepspeed import make_optimizer
    from stages.train import make_plan
    from stages.train.data import CachedSource
    from stages.train.student import build_student

    torch.set_num_threads(1)
    config = make_config(cached, "w", generator=generator, clip_mode=clip_mode, lr=0.01, grad_clip=1.0,
                         entropy_weight=weight, collapse_weight=weight, spatial_prior=prior)
    assert config.train.optimizer == "adamw"
    adapter = load_adapter(config.model.path)
    student = build_student(adapter, config.train, config.train.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.train)
    train_plan, test_plan = make_plan(config, "train"), make_plan(config, "test")
    train = CachedSource(train_plan["feature_args"], train_plan["teacher_args"], train_plan["questions"])
    test = CachedSource(test_plan["feature_args"], test_plan["teacher_args"], test_plan["questions"])
    train_keys = [(s, r) for s, rows in enumerate(train_plan["shard_rows"]) for r in range(rows)]
    test_keys = [(s, r) for s, rows in enumerate(test_plan["shard_rows"]) for r in range(rows)]
    before = _heldout_kl(student, test, test_keys)
    student.train()
    for step in range(40):
        batch = [train_keys[(4 * step + i) % len(train_keys)] for i in range(4)]
        out = student(train.examples(batch), RATE)
        optimizer.zero_grad()
        out["loss"].backward()
        if clip_mode == "norm":  # what DeepSpeed's gradient_clipping does in the pipeline
            torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
        optimizer.step()
    student.eval()
    after = _heldout_kl(student, test, test_keys)
    assert after < before - margin, (before, after)  # measured: paper 0.879 -> 0.854, normed 0.805 -> 0.78


def test_planned_epochs_adapt_to_the_data_size():
    from stages.train.data import planned_epochs

    assert planned_epochs(per_epoch=36, epochs=6, min_steps=0) == 6  # off: the configured epochs
    assert planned_epochs(per_epoch=36, epochs=6, min_steps=300) == 9  # ceil(300 / 36) = 9 whole epochs
    assert planned_epochs(per_epoch=36, epochs=6, min_steps=216) == 6  # 6 x 36 = 216 already
    assert planned_epochs(per_epoch=1000, epochs=2, min_steps=300) == 2  # a large dataset: the configured epochs
    with pytest.raises(ValueError, match="min_steps"):
        planned_epochs(per_epoch=10, epochs=1, min_steps=-1)
