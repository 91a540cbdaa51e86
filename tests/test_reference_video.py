"""Video dialogues in the reference recipe's stage 2 (Qwen2.5-VL; docs/design.md §7): a tiny model learns from a
batch mixing MT-Shapes images and MT-Video videos through the model's own video path, and a video example's inputs
are exactly what the project's inference path (``compress.lvlm.video.video_adapter``) feeds for the same file and
frame sampling, down to the first answer's logits."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

from test_reference_qwen_drop import tiny_qwen  # noqa: E402


def test_mixed_image_video_batch_overfits(tmp_path):
    from infra.reference.evaluation import evaluate
    from infra.reference.training import collate
    from pipeline.dialogues import load_dialogues

    model, proc, examples = tiny_qwen(tmp_path, shapes=2, videos=2)
    assert ["video_grid_thw" in e for e in examples] == [False, False, True, True]
    batch = collate([examples[2], examples[0], examples[3], examples[1]], proc.tokenizer.pad_token_id)
    assert batch["video_grid_thw"].tolist() == [[4, 12, 12]] * 2
    assert batch["image_grid_thw"].tolist() == [[1, 12, 12]] * 2
    assert batch["mm_token_type_ids"].max(1).values.tolist() == [2, 1, 2, 1]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    videos = load_dialogues(tmp_path / "v" / "train" / "dialogues.jsonl")
    scores = evaluate(model, proc, videos, device="cpu")  # greedy generation through the video path
    assert scores["n"] == 2 and set(scores["by_type"]) == {t.meta["type"] for d in videos for t in d.turns}


def test_video_example_is_what_the_video_adapter_feeds(tmp_path):
    from compress.lvlm import load_adapter
    from compress.lvlm.session import ChatSession
    from compress.lvlm.video import video_adapter
    from infra.reference.chat import render_dialogue
    from pipeline.dialogues import load_dialogues

    model, proc, examples = tiny_qwen(tmp_path, shapes=1, videos=1)
    video = load_dialogues(tmp_path / "v" / "train" / "dialogues.jsonl")[0]
    ex = examples[1]
    model.save_pretrained(tmp_path / "ref")
    proc.save_pretrained(tmp_path / "ref")
    adapter = video_adapter(load_adapter(tmp_path / "ref"), num_frames=proc.num_frames)
    encoded = adapter.prepare(video.image)
    assert torch.equal(ex["pixel_values_videos"], encoded.pixel_values)
    assert ex["video_grid_thw"].tolist() == adapter.grid_thw(encoded.layout)[0].tolist()
    assert float(ex["second_per_grid_ts"]) == encoded.seconds_per_step
    first = adapter.segment_ids([video.turns[0].question], vqa=False)[0]
    n = encoded.layout.num_tokens
    at = first.index(adapter.image_token_id)
    expanded = first[:at] + [adapter.image_token_id] * n + first[at + 1:]
    assert ex["input_ids"][:len(expanded)].tolist() == expanded  # the prompt up to the first answer

    session = ChatSession(adapter, "full", max_new_tokens=1)
    session.set_image(video.image)
    got = session.ask(video.turns[0].question).first_logits
    text = proc.apply_chat_template(render_dialogue([(video.turns[0].question, None)], "video"),
                                    add_generation_prompt=True)
    with torch.no_grad():  # transformers' own forward on the recipe processor's inputs
        ref = model(**proc(videos=[video.image], text=[text])).logits[0, -1]
    assert torch.allclose(got.float(), ref, atol=1e-4), (got - ref).abs().max()
