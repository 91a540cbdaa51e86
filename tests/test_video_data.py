"""Video dialogues (docs/design.md §3): the ``video`` field, the MT-Video generator checked against the decoded
pixels, and the MT-Video-MME builder on a fixture in the official Video-MME columns."""

from __future__ import annotations

import json

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("av")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_dialogue_carries_a_video_validated_like_an_image(tmp_path):
    from pipeline.dialogues import load_dialogues, parse_dialogue, write_dialogues

    (tmp_path / "clip.mp4").write_bytes(b"x")
    turns = [{"question": "what moves ?", "answers": ["circle"]}]
    write_jsonl(tmp_path / "d.jsonl", [{"dialogue_id": "v1", "video": "clip.mp4", "turns": turns, "source": "s"}])
    [d] = load_dialogues(tmp_path / "d.jsonl")
    assert d.kind == "video" and d.video == str(tmp_path / "clip.mp4") and d.image == d.video
    write_dialogues(tmp_path / "out" / "d.jsonl", [d])
    assert '"video": "' in (tmp_path / "out" / "d.jsonl").read_text() and '"image"' not in \
        (tmp_path / "out" / "d.jsonl").read_text()
    with pytest.raises(ValueError, match="field 'video': file not found: .*gone.mp4"):
        parse_dialogue({"dialogue_id": "v", "video": "gone.mp4", "turns": turns, "source": "s"}, tmp_path)
    with pytest.raises(ValueError, match="field 'video': given together with 'image'"):
        parse_dialogue({"dialogue_id": "v", "video": "clip.mp4", "image": "clip.mp4", "turns": turns,
                        "source": "s"}, tmp_path)
    with pytest.raises(ValueError, match="field 'video': relative path '../x.mp4' leaves"):
        parse_dialogue({"dialogue_id": "v", "video": "../x.mp4", "turns": turns, "source": "s"}, tmp_path)


def colour_at(frame, x, y):
    return frame[int(round(y)), int(round(x))].astype(int)


def near(a, b, tol=40):
    return int(np.abs(np.asarray(a) - np.asarray(b)).max()) <= tol


def test_mt_video_answers_agree_with_the_decoded_pixels(tmp_path):
    """For each dialogue, the answers are recomputed from the decoded frames alone (object centres from the scene
    file): the first frame whose centre pixel shows the object's colour, the colour after the change, the direction
    of the centre's colour blob, the count of objects visible in the last frame."""
    from compress.lvlm.video import decode_video
    from pipeline.datasets import mt_video
    from pipeline.datasets.mt_shapes import COLORS
    from pipeline.dialogues import load_dialogues

    counts = mt_video.generate(tmp_path, 10, seed=3, val=0, test=0)
    assert counts == {"train": 10, "val": 0, "test": 0}
    scenes = {s["scene_id"]: s for s in map(json.loads, (tmp_path / "train" / "video_scenes.jsonl").open())}
    checked = set()
    for d in load_dialogues(tmp_path / "train" / "dialogues.jsonl"):
        assert d.kind == "video" and len(d.turns) == 3
        frames = decode_video(d.video, num_frames=64).frames
        scene = scenes[d.dialogue_id]
        assert frames.shape == (8, scene["height"], scene["width"], 3)
        for turn in d.turns:
            kind = turn.meta["type"]
            o = scene["objects"][turn.meta["objects"][0]] if turn.meta["objects"] else None
            shown = [near(colour_at(f, o["x0"], o["y0"]), COLORS[o["color"]]) for f in frames] if o else []
            if kind == "appear_frame":
                assert turn.answers[0] == str(shown.index(True) + 1)
            elif kind == "appear_half":
                assert turn.answers[0] == ("first" if shown.index(True) < 4 else "second")
            elif kind == "change_color":
                last = colour_at(frames[-1], o["x0"], o["y0"])
                assert near(last, COLORS[turn.answers[0]]) and not near(last, COLORS[o["color"]])
            elif kind == "change_half":
                assert turn.answers[0] == ("first" if shown.index(False) < 4 else "second")
            elif kind == "direction":
                dx, dy = o["x1"] - o["x0"], o["y1"] - o["y0"]
                assert near(colour_at(frames[-1], o["x1"], o["y1"]), COLORS[o["color"]])
                assert turn.answers[0] in (("right" if dx > 0 else "left") if abs(dx) > abs(dy) else
                                           ("down" if dy > 0 else "up"),)
                assert max(abs(dx), abs(dy)) > scene["width"] / 4 or max(abs(dx), abs(dy)) > scene["height"] / 4
            elif kind == "shape":
                assert turn.answers[0] == o["shape"]
            checked.add(kind)
    assert {"appear_frame", "change_color", "direction", "shape"} <= checked


def test_mt_video_is_deterministic_and_asks_about_three_objects(tmp_path):
    from pipeline.datasets import mt_video

    a, b = tmp_path / "a", tmp_path / "b"
    mt_video.generate(a, 5, seed=1, val=0, test=0)
    mt_video.generate(b, 5, seed=1, val=0, test=0)
    assert (a / "train" / "dialogues.jsonl").read_text().replace(str(a), "") == \
        (b / "train" / "dialogues.jsonl").read_text().replace(str(b), "")
    for line in (a / "train" / "dialogues.jsonl").open():
        objects = [t["meta"]["objects"][0] for t in json.loads(line)["turns"]]
        assert sorted(objects) == [0, 1, 2]  # each turn about another object


def test_data_commands_build_and_check_video_dialogues(tmp_path, capsys):
    from pipeline.commands.cli import main

    assert main(["data", "mt-video", "--out", str(tmp_path / "v"), "--dialogues", "4", "--val", "1", "--test", "1",
                 "--frames", "6", "--image-size", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"train": 2, "val": 1, "test": 1}
    assert main(["data", "check", str(tmp_path / "v" / "train" / "dialogues.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dialogues"] == 2 and summary["errors"] == []
    video = next((tmp_path / "v" / "train" / "videos").iterdir())
    video.write_bytes(b"broken")
    assert main(["data", "check", str(tmp_path / "v" / "train" / "dialogues.jsonl")]) != 0
    assert f"field 'video': video file {video} cannot be decoded" in capsys.readouterr().err


def official_rows():
    """Two videos' rows in the official columns (values in the official style; the second video has two questions)."""
    rows = []
    for vid, yt, n in (("001", "fFjv93ACGo8", 3), ("002", "ZQ7abcdEfgh", 2)):
        for q in range(1, n + 1):
            rows.append({"video_id": vid, "duration": "short", "domain": "Knowledge",
                         "sub_category": "Humanity & History",
                         "url": f"https://www.youtube.com/watch?v={yt}", "videoID": yt, "question_id": f"{vid}-{q}",
                         "task_type": "Counting Problem", "question": f"Question {q} about video {vid}?",
                         "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same "
                                     "number."], "answer": "ABC"[q - 1]})
    return rows[::-1]  # out of order on purpose: turns follow question ids


def test_video_mme_builder_groups_a_videos_three_questions(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.commands.cli import main
    from pipeline.dialogues import load_dialogues

    table = pa.Table.from_pylist(official_rows())
    pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
    (tmp_path / "video").mkdir()
    for yt in ("fFjv93ACGo8", "ZQ7abcdEfgh"):
        (tmp_path / "video" / f"{yt}.mp4").write_bytes(b"x")
    assert main(["data", "video-mme", "--annotations", str(tmp_path / "test-00000-of-00001.parquet"),
                 "--videos", str(tmp_path / "video"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["dialogues"], summary["questions"], summary["dropped_questions"]) == (1, 5, 2)
    [d] = load_dialogues(tmp_path / "out" / "dialogues.jsonl")
    assert d.kind == "video" and d.video.endswith("video/fFjv93ACGo8.mp4") and d.source == "video_mme"
    assert [t.meta["question_id"] for t in d.turns] == ["001-1", "001-2", "001-3"]
    assert [t.answers for t in d.turns] == [("A",), ("B",), ("C",)]
    assert d.turns[0].question.splitlines()[:2] == ["Question 1 about video 001?", "A. Apples."]
    assert d.meta["duration"] == "short" and d.meta["video_id"] == "001"


def test_video_mme_bad_annotations_fail_naming_file_and_column(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.commands.cli import main

    rows = official_rows()
    for r in rows:
        del r["videoID"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert main(["data", "video-mme", "--annotations", str(tmp_path / "a.parquet"), "--videos", str(tmp_path),
                 "--out", str(tmp_path / "o")]) != 0
    assert "a.parquet: missing column 'videoID'" in capsys.readouterr().err
    rows = official_rows()
    rows[0]["answer"] = "E"
    write_jsonl(tmp_path / "b.jsonl", rows)
    assert main(["data", "video-mme", "--annotations", str(tmp_path / "b.jsonl"), "--videos", str(tmp_path),
                 "--out", str(tmp_path / "o")]) != 0
    assert "b.jsonl row 0: answer 'E' is not one of the options' letters" in capsys.readouterr().err


def test_stages_read_video_dialogues_with_their_file_and_line(tmp_path):
    """The stages take video dialogues (a mixed file is refused before any work: tests/test_video_stages.py); each
    record carries its file:line, which a video's decoding error names."""
    from pipeline.config import config_from_dict
    from stages.common import load_split

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "v.mp4").write_bytes(b"x")
    turns = [{"question": "q ?", "answers": ["a"]}]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"dialogue_id": "img", "image": "a.png", "turns": turns, "source": "s"},
                       {"dialogue_id": "vid", "video": "v.mp4", "turns": turns, "source": "s"}])
    records, bad = load_split(config_from_dict({"data": {"train": str(path)}}), "train", None)
    assert bad == [] and [r["dialogue_id"] for r in records] == ["img", "vid"]
    assert [r["where"] for r in records] == [f"{path}:1", f"{path}:2"]
    assert records[1]["image"] == str(tmp_path / "v.mp4")  # the stages' one media field, a video's file here
