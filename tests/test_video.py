"""Video (docs/design.md §5, video): PyAV decoding, and Qwen2.5-VL's video path against transformers' own forward on
a tiny model from config (the image tests' model, tokenizer and ChatML template with its video placeholder)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
av = pytest.importorskip("av")

from test_qwen2_5_vl import (IMAGE_ID, QUESTIONS, TEMPLATE, reference_logits, reference_positions,  # noqa: E402
                             tiny_processor, tiny_qwen, tiny_qwen2, tiny_tokenizer)

from compress.reduction import Reduction  # noqa: E402

VIDEO_ID = 5
ATOL = 1e-4
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
VIDEO_TEMPLATE = TEMPLATE.replace(
    "{% elif 'text' in content %}",
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}")


def write_video(path, frames, rate: int = 4):
    """frames (N, H, W, 3) uint8 -> an MPEG-4 file at ``rate`` frames per second."""
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=rate)
    stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def flat_frames(colours, h=32, w=48):
    return np.stack([np.full((h, w, 3), c, np.uint8) for c in colours])


def test_decode_uniform_and_fps_sampling_keep_the_known_colours(tmp_path):
    from compress.lvlm.video import decode_video

    path = tmp_path / "colours.mp4"
    write_video(path, flat_frames(COLOURS), rate=4)  # 6 frames, 1.5 s
    uniform = decode_video(path, num_frames=3)  # linspace(0, 5, 3) rounded: frames 0, 2 (2.5 half-to-even), 5
    assert uniform.frames.shape == (3, 32, 48, 3)
    for got, want in zip(uniform.frames, [COLOURS[0], COLOURS[2], COLOURS[5]]):
        assert np.abs(got.reshape(-1, 3).mean(0) - np.array(want)).max() < 12  # yuv420p round trip
    assert uniform.fps == pytest.approx(3 * 4 / 6)
    by_rate = decode_video(path, fps=2)  # every second frame: 0, 2, 4
    assert by_rate.frames.shape[0] == 3 and by_rate.fps == 2
    for got, want in zip(by_rate.frames, [COLOURS[0], COLOURS[2], COLOURS[4]]):
        assert np.abs(got.reshape(-1, 3).mean(0) - np.array(want)).max() < 12
    assert decode_video(path, num_frames=50).frames.shape[0] == 6  # never more frames than the file has


def test_unreadable_and_missing_files_fail_in_one_line_naming_the_file(tmp_path):
    from compress.lvlm.video import decode_video

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="broken.mp4 cannot be decoded") as err:
        decode_video(bad, num_frames=2)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="absent.mp4 does not exist"):
        decode_video(tmp_path / "absent.mp4", num_frames=2)
    with pytest.raises(ValueError, match="exactly one of num_frames and fps"):
        decode_video(bad)


@pytest.fixture(scope="module")
def video_qwen():
    from compress.lvlm.qwen2_5_vl import Qwen25VLAdapter
    from compress.lvlm.video import video_adapter

    tok = tiny_tokenizer()
    tok.chat_template = VIDEO_TEMPLATE
    return video_adapter(Qwen25VLAdapter(tiny_qwen(), tok, tiny_processor(), "<tiny-qwen2.5-vl>"), num_frames=5)


def random_video(n, h=24, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_frames_pair_into_the_temporal_patches_the_image_path_broadcasts():
    """Two identical frames make the step the image processor makes of one image (it repeats the frame over the
    temporal patch); distinct frames fill the temporal axis in order."""
    from compress.lvlm.video import pair_frames

    proc = tiny_processor()
    frames = random_video(3, seed=1)
    per = [proc(images=[f], return_tensors="pt")["pixel_values"] for f in frames]
    same = pair_frames([per[0], per[0]], 3, 2, 4)
    assert torch.equal(same, per[0])
    three = pair_frames(per, 3, 2, 4).reshape(2, per[0].shape[0], 3, 2, 4, 4)
    for step, (a, b) in enumerate([(0, 1), (2, 2)]):  # the last frame is repeated to fill step 2
        assert torch.equal(three[step, :, :, 0], per[a].reshape(-1, 3, 2, 4, 4)[:, :, 0])
        assert torch.equal(three[step, :, :, 1], per[b].reshape(-1, 3, 2, 4, 4)[:, :, 0])


def test_video_prompt_holds_one_video_placeholder(video_qwen):
    segs = video_qwen.segment_ids(QUESTIONS)
    assert [s.count(VIDEO_ID) for s in segs] == [1, 0, 0] and IMAGE_ID not in segs[0]
    i = segs[0].index(VIDEO_ID)
    assert segs[0][i - 1: i + 2] == [6, VIDEO_ID, 7]


def hand_video_offsets(t, h, w, interval):
    """(floor(i * interval), r, c) for every token, step-major."""
    return [(int(np.floor(np.float32(i) * np.float32(interval))), r, c) for i in range(t) for r in range(h)
            for c in range(w)]


@pytest.mark.parametrize("fps", [1.0, 0.7])
def test_no_reduction_equals_the_model_forward_on_the_video(fps, video_qwen):
    from compress.lvlm.session import ChatSession, expand_image
    from compress.lvlm.video import Video

    video = Video(random_video(5, seed=2), fps)  # 5 frames -> 3 temporal steps (last repeated), 3 x 5 tokens each
    session = ChatSession(video_qwen, "full", max_new_tokens=1)
    session.set_image(video)
    first = session.ask(QUESTIONS[0])
    assert session.image_tokens.shape[0] == 3 * 3 * 5
    ids = expand_image(video_qwen.segment_ids(QUESTIONS[:1])[0], VIDEO_ID, 45)
    ids_t = torch.tensor([ids])
    encoded = session.batch.encoded[0]
    with torch.no_grad():
        ref = video_qwen.full_forward_logits(ids_t, encoded)[0, -1]
        rope, _ = video_qwen.model.model.get_rope_index(
            ids_t, 2 * (ids_t == VIDEO_ID).int(), video_grid_thw=torch.tensor([[3, 6, 10]]),
            second_per_grid_ts=torch.tensor([2 / fps]))
    assert torch.allclose(first.first_logits, ref, atol=ATOL), (first.first_logits - ref).abs().max()
    interval = 4 * 2 / fps  # tokens_per_second (the config's 4) x seconds per step
    start = ids.index(VIDEO_ID)
    visual = rope[:, 0, start: start + 45].T - start
    assert visual.tolist() == [list(o) for o in hand_video_offsets(3, 3, 5, interval)]
    assert int(rope[0, 0, start + 45]) == start + 5  # text after the video: start + max(h', w')


def test_video_file_end_to_end_equals_the_model(tmp_path, video_qwen):
    from compress.lvlm.session import ChatSession, expand_image

    path = tmp_path / "v.mp4"
    write_video(path, random_video(8, 32, 48, seed=3), rate=4)
    session = ChatSession(video_qwen, "full", max_new_tokens=1)
    session.set_image(path)  # 5 of 8 frames -> 3 steps of 4 x 6
    first = session.ask(QUESTIONS[1])
    ids = expand_image(video_qwen.segment_ids(QUESTIONS[1:2])[0], VIDEO_ID, 72)
    with torch.no_grad():
        ref = video_qwen.full_forward_logits(torch.tensor([ids]), session.batch.encoded[0])[0, -1]
    assert session.image_tokens.shape[0] == 72
    assert torch.allclose(first.first_logits, ref, atol=ATOL)


def every_third(x, num_keep, layout=None):
    order = torch.arange(0, x.shape[0], 3)[:num_keep]
    return Reduction(tokens=x[order], keep_indices=order)


@pytest.mark.parametrize("name", ["every_third", "metacompress", "spatial", "random", "sample"])
def test_reduced_video_tokens_keep_their_t_h_w(name, video_qwen):
    """Kept tokens keep (t, h, w); MetaCompress's token i sits at input floor((i + 0.5) n / m); Spatial pools within a
    temporal step; the reduced second turn on the cache equals transformers' model re-prefilled at those positions."""
    from compress.lvlm.methods import get_method, register_method
    from compress.lvlm.session import ChatSession, expand_image
    from compress.lvlm.video import Video
    from compress.metacompress import MetaCompress

    register_method("every_third", "feature", every_third)
    torch.manual_seed(0)
    method = get_method(name, MetaCompress(64, 16, 3, (4, 4)).eval() if name == "metacompress" else None)
    video = Video(random_video(4, seed=4), 0.5)  # 2 steps of 3 x 5, interval 4 * 2 / 0.5 = 16
    session = ChatSession(video_qwen, method, 0.6, max_new_tokens=2)
    session.set_image(video)
    tokens = session.image_tokens
    n, m = 30, tokens.shape[0]
    cells = hand_video_offsets(2, 3, 5, 16.0)
    positions = [tuple(p) for p in session.batch.image_positions[0].offsets.tolist()]
    if name == "every_third":
        assert positions == [cells[i] for i in range(0, n, 3)][:m]
    elif name == "metacompress":
        assert positions == [cells[int((i + 0.5) * n / m)] for i in range(m)]
    elif name == "spatial":  # 12 tokens: 6 per step, each the mean cell of a rectangle inside one step
        assert sorted({p[0] for p in positions}) == [0, 16] and [p[0] for p in positions].count(0) == 6
    else:
        assert all(p in cells for p in positions) and len(set(positions)) == m
    segs = video_qwen.segment_ids(QUESTIONS[:2])
    segs[0] = expand_image(segs[0], VIDEO_ID, m)
    answer = session.ask(QUESTIONS[0]).answer_ids
    second = session.ask(QUESTIONS[1])
    full = segs[0] + answer + segs[1]
    ref = reference_logits(video_qwen, [IMAGE_ID if i == VIDEO_ID else i for i in full], tokens,
                           reference_positions(full, positions, 5, VIDEO_ID))
    assert torch.allclose(second.first_logits, ref, atol=ATOL)


def test_fastv_runs_over_video_tokens(video_qwen):
    from compress.lvlm.session import ChatSession
    from compress.lvlm.video import Video

    session = ChatSession(video_qwen, "fastv", 0.75, max_new_tokens=2, fastv_k=2)
    session.set_image(Video(random_video(4, seed=5), 1.0))
    first = session.ask(QUESTIONS[0])
    assert first.stats.visual_tokens == round(30 * 0.25) and len(session.fastv_kept) == 8


def test_qwen2_vl_video_counts_steps(tmp_path):
    """Qwen2-VL numbers temporal steps 0, 1, 2 (no seconds scaling); no reduction equals its forward."""
    from compress.lvlm.qwen2_5_vl import Qwen2VLAdapter
    from compress.lvlm.session import ChatSession, expand_image
    from compress.lvlm.video import Video, video_adapter

    tok = tiny_tokenizer()
    tok.chat_template = VIDEO_TEMPLATE
    adapter = video_adapter(Qwen2VLAdapter(tiny_qwen2(), tok, tiny_processor(), "<tiny-qwen2-vl>"))
    session = ChatSession(adapter, "full", max_new_tokens=1)
    session.set_image(Video(random_video(6, seed=6), 0.5))
    first = session.ask(QUESTIONS[0])
    assert [s.time for s in session.batch.encoded[0].layout.segments] == [0, 1, 2]
    ids = expand_image(adapter.segment_ids(QUESTIONS[:1])[0], VIDEO_ID, 45)
    with torch.no_grad():
        ref = adapter.full_forward_logits(torch.tensor([ids]), session.batch.encoded[0])[0, -1]
    assert torch.allclose(first.first_logits, ref, atol=ATOL)


def test_other_families_have_no_video_path():
    from compress.lvlm.video import video_adapter

    class Other:
        family, model_dir = "llava", "<llava>"

    with pytest.raises(ValueError, match="llava .* has no video path"):
        video_adapter(Other())


def test_video_layout_round_trips_and_image_layouts_serialise_as_before():
    from compress.layout import Layout
    from compress.lvlm.video import video_layout

    layout = video_layout((3, 6, 10), 2, 16.0)
    assert [s.time for s in layout.segments] == [0, 16, 32] and [s.offset for s in layout.segments] == [0, 15, 30]
    assert Layout.from_dict(layout.to_dict()) == layout
    layout.validate()
    assert Layout.grid(2, 3).to_dict() == {"num_tokens": 6, "segments": [
        {"name": "base", "height": 2, "width": 3, "offset": 0, "row_stride": 3}], "newlines": []}
