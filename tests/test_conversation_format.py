"""Conversation formats per family and segment-wise tokenisation with real tokenizers (docs/design.md §5).

Expected prompts are written out by hand from LLaVA's ``conv_vicuna_v1`` / ``conv_mistral_instruct``; the
tokenisation check compares the segments the KV-cache protocol feeds against one tokenisation of the whole
conversation text (rendered with the answers written in by hand, not by the code under test).
"""

from __future__ import annotations

import pytest

from compress.lvlm.conversation import VICUNA_SYSTEM, family_format
from compress.lvlm.llava import LlavaAdapter
from compress.lvlm.llava_next import LlavaNextAdapter
from tests.tiny_models import (byte_bpe_tokenizer, random_image, sentencepiece_tokenizer, tiny_image_processor,
                               tiny_llava, tiny_llava_for)

SYS = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


def adapter_for(tok, family="llava", text_model="llama", **kw):
    model = tiny_llava_for(tok, family, text_model=text_model)
    cls = LlavaAdapter if family == "llava" else LlavaNextAdapter
    return cls(model, tok, tiny_image_processor(family), f"<{family}-{text_model}>", **kw)


def test_vicuna_v1_segments_match_hand_written_prompt():
    model, tok = tiny_llava(num_layers=1)
    ad = LlavaAdapter(model, tok, tiny_image_processor("llava"), "<tiny>", conversation="vicuna_v1")
    assert VICUNA_SYSTEM == SYS
    assert ad.segment_texts(["what is red?", "how many?", "which side?"]) == [
        SYS + " USER: <image>\nwhat is red? ASSISTANT:", "</s>USER: how many? ASSISTANT:",
        "</s>USER: which side? ASSISTANT:"]


def test_mistral_instruct_segments_match_hand_written_prompt(sp_tok):
    ad = adapter_for(sp_tok, "llava_next", "mistral")
    assert ad.conversation == "mistral_instruct"  # auto: a Mistral LLM and a tokenizer that spells [INST]
    assert ad.segment_texts(["What is red?", "Is there a dog?"]) == [
        "[INST] <image>\nWhat is red? [/INST]", "</s>[INST] Is there a dog? [/INST]"]


def test_auto_picks_the_trained_format_when_the_tokenizer_spells_it(sp_tok):
    assert family_format("llava", "llama") == "vicuna_v1"
    assert family_format("llava_next", "llama") == "vicuna_v1"
    assert family_format("llava_next", "mistral") == "mistral_instruct"
    assert family_format("llava_next", "qwen2") is None
    assert adapter_for(sp_tok).conversation == "vicuna_v1"
    assert adapter_for(sp_tok, "llava_next").conversation == "vicuna_v1"
    # the word-level test models cannot spell the system prompt: they keep their own template
    model, tok = tiny_llava(num_layers=1)
    assert LlavaAdapter(model, tok, tiny_image_processor("llava"), "<tiny>").conversation == "template"


def test_llava_hf_template_is_replaced_by_vicuna_v1(sp_tok):
    # llava-hf's LLaVA-1.5 template (no system prompt, no </s>), as a checkpoint would ship it
    hf = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}{% if c['type'] == "
          "'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
          "{% for c in m['content'] %}{{ c['text'] }}{% endfor %} {% endif %}{% endfor %}"
          "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    sp_tok.chat_template = hf
    try:
        assert adapter_for(sp_tok, conversation="template").segment_texts(["Q1", "Q2"])[1] == " USER: Q2 ASSISTANT:"
        assert adapter_for(sp_tok).segment_texts(["Q1", "Q2"])[1] == "</s>USER: Q2 ASSISTANT:"
    finally:
        sp_tok.chat_template = None


def test_template_rendering_a_literal_backslash_s_is_refused(sp_tok):
    bad = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}{% if c['type'] == "
           "'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]{% else %} "
           "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}<\\s>{% endif %}{% endfor %}")
    model = tiny_llava_for(sp_tok, "llava_next", text_model="mistral")
    with pytest.raises(ValueError, match=r"<\\\\s>.*conversation="):
        LlavaNextAdapter(model, sp_tok, tiny_image_processor("llava_next"), "<ckpt>", chat_template=bad)


def test_unknown_conversation_name_is_refused(sp_tok):
    with pytest.raises(ValueError, match="conversation='chatml'"):
        adapter_for(sp_tok, conversation="chatml")


QUESTIONS = ["What is the color of the car?", "Is there a dog?", "How many?"]
ANSWERS = ["red", "yes", "two three"]


def whole_text(fmt: str) -> str:
    """The three-turn conversation with its answers, written out by hand."""
    q = [f"{x}\nAnswer the question using a single word or phrase." for x in QUESTIONS]
    if fmt == "vicuna_v1":
        return (f"{SYS} USER: <image>\n{q[0]} ASSISTANT: {ANSWERS[0]}</s>USER: {q[1]} ASSISTANT: {ANSWERS[1]}</s>"
                f"USER: {q[2]} ASSISTANT:")
    return f"[INST] <image>\n{q[0]} [/INST] {ANSWERS[0]}</s>[INST] {q[1]} [/INST] {ANSWERS[1]}</s>[INST] {q[2]} [/INST]"


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_bpe"])
@pytest.mark.parametrize("family,text_model,fmt", [("llava", "llama", "vicuna_v1"),
                                                   ("llava_next", "mistral", "mistral_instruct")])
def test_segments_and_answers_tokenise_like_the_whole_conversation(kind, family, text_model, fmt, sp_tok):
    tok = sp_tok if kind == "sentencepiece" else byte_bpe_tokenizer()
    ad = adapter_for(tok, family, text_model)
    assert ad.conversation == fmt
    segments = ad.segment_ids(QUESTIONS)
    fed = segments[0] + ad.answer_ids(ANSWERS[0]) + segments[1] + ad.answer_ids(ANSWERS[1]) + segments[2]
    assert fed == tok(whole_text(fmt), add_special_tokens=True).input_ids
    assert fed[0] == tok.bos_token_id and fed.count(tok.eos_token_id) == 2


def test_end_of_turn_token_is_a_distillation_target(sp_tok):
    """Answers given as ``target_ids`` (answer + stop token): the teacher-forced ids equal the hand-written whole
    conversation with its ``</s>`` separators, and the stop positions are targets whose logits equal the model's
    own forward (``full_forward_logits``) at the same positions."""
    import torch

    from compress.lvlm.session import answer_logits, dialogue_ids

    ad = adapter_for(sp_tok)
    eos = sp_tok.eos_token_id
    answers = [ad.answer_ids(ANSWERS[0]) + [eos], ad.answer_ids(ANSWERS[1]) + [eos], ad.answer_ids(ANSWERS[2])]
    ids, positions, turn_of = dialogue_ids(ad, 1, QUESTIONS, answers)
    assert ids == sp_tok(whole_text("vicuna_v1") + " " + ANSWERS[2], add_special_tokens=True).input_ids
    stop_positions = [i for i, tid in enumerate(ids) if tid == eos]
    assert len(stop_positions) == 2 and set(stop_positions) <= set(positions)
    assert len(positions) == sum(len(a) for a in answers) and turn_of.count(0) == len(answers[0])

    enc = ad.encode(random_image())
    out = answer_logits(ad, enc.tokens, QUESTIONS, answers)
    full_ids, _, _ = dialogue_ids(ad, enc.tokens.shape[0], QUESTIONS, answers)
    at = torch.tensor([i for i, tid in enumerate(full_ids) if tid == eos])
    ref = ad.full_forward_logits(torch.tensor([full_ids]), enc)[0, at - 1]
    got = out.logits[out.target_ids == eos]
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4)


def test_turn_result_target_ids_end_with_the_stop_token_that_ended_the_answer(sp_tok):
    from compress.lvlm.session import ChatSession

    ad = adapter_for(sp_tok)
    session = ChatSession(ad, "full", max_new_tokens=3)
    session.set_image(random_image())
    first = session.ask(QUESTIONS[0])
    assert first.stop_id is None and first.target_ids == first.answer_ids and len(first.answer_ids) == 3
    ad.stop_ids = ad.stop_ids | {first.answer_ids[1]}  # the second greedy token now ends the answer
    session.set_image(random_image())
    again = session.ask(QUESTIONS[0])
    assert again.answer_ids == first.answer_ids[:1] and again.stop_id == first.answer_ids[1]
    assert again.target_ids == first.answer_ids[:2]
