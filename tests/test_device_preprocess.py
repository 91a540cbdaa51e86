"""Image preprocessing as tensor ops (compress.lvlm.image_ops) against transformers' Pil image processors, and the
truncated vision tower + projector (+ LLaVA-NeXT packing as a gather) against ``adapter.features``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import random_image, tiny_adapter  # noqa: E402

SIZES = [(336, 336), (672, 672), (480, 640), (500, 333), (200, 900)]


@pytest.mark.parametrize("arch,family", [("llava-1.5-7b", "llava"), ("llava-next-7b", "llava_next")])
def test_device_pixels_match_the_image_processor(arch, family):
    """The documented tolerance: at most 3 8-bit levels anywhere, a mean under 0.02 levels; exact without a resize."""
    from compress.lvlm.image_ops import pil_to_tensor, pixel_values
    from infra.architectures import build_image_processor, get_architecture

    proc = build_image_processor(get_architecture(arch))
    level = 1 / 255 / min(proc.image_std)
    for h, w in SIZES:
        image = random_image(h, w, seed=h + w)
        ref = proc(images=[image], return_tensors="pt")["pixel_values"]
        got = pixel_values(family, proc, pil_to_tensor(image), torch.float32)
        assert got.shape == ref.shape, (h, w)
        diff = (got - ref).abs()
        assert diff.max() <= 3 * level and diff.mean() <= 0.02 * level, (h, w, diff.max() / level)
        if family == "llava" and (h, w) == (336, 336):
            assert diff.max() <= 1e-5


@pytest.mark.parametrize("family,sizes", [("llava", [(32, 32), (40, 64)]), ("llava_next", [(32, 32), (24, 40),
                                                                                              (64, 20)])])
def test_device_image_path_equals_adapter_features(family, sizes):
    """Accelerator.features (tower to the feature layer, projector, packing) == adapter.features on the same pixels;
    Accelerator.prepare gives the processor's pixel values within tolerance and the same layout."""
    from compress.lvlm.accel import Accelerator

    adapter = tiny_adapter(family, seed=1)
    fast = Accelerator(adapter, static_cache=False, device_image=True)
    for size in sizes:
        image = random_image(*size, seed=sum(size))
        ref = adapter.prepare(image)
        got = fast.prepare(image)
        assert got.layout == ref.layout and got.image_size == ref.image_size
        torch.testing.assert_close(got.pixel_values, ref.pixel_values, atol=3 / 255 / 0.26, rtol=0)
        torch.testing.assert_close(fast.features(ref).tokens, adapter.features(ref).tokens, atol=1e-6, rtol=1e-6)
