"""Unit tests of the pure pieces: decoding, stop sequences, penalties, ids."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import model
from decoding import IncrementalDecoder, StopMatcher
from prepare import body_digest
from routes import parse_last_event_id
from sampling import OpenAIPenalties
from schemas import APIError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model.embedded_model_dir(), gguf_file=model.EMBEDDED_GGUF)


@pytest.mark.parametrize("text", [
    "Plain ASCII text, nothing special.",
    "Émile a mangé une crème brûlée à Besançon.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji: 🐉🔥 and family 👨‍👩‍👧 and flags 🇫🇷🇯🇵.",
    "Mixed: naïve café – “quotes” … ∑ ∫ √ ≠ ≤ 𝄞",
])
def test_incremental_decoding_never_splits_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tokenizer)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)
    if any(ord(c) > 0xFFFF for c in text):
        assert "" in deltas[:-1]  # some token ended mid-character and was held back


def test_incremental_decoding_skips_special_tokens(tokenizer):
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    dec = IncrementalDecoder(tokenizer)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "Hello"


def feed_all(stops, pieces):
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    return "".join(out) + m.flush(), m.stopped, out


def test_stop_sequence_split_across_pieces_is_held_then_cut():
    text, stopped, out = feed_all(["END"], ["Hello E", "N", "D tail"])
    assert text == "Hello " and stopped
    assert out[0] == "Hello "  # 'E' held back: it may start the stop sequence


def test_held_text_is_released_when_it_is_not_a_stop():
    text, stopped, out = feed_all(["END"], ["Hello E", "N", "d of it"])
    assert text == "Hello ENd of it" and not stopped
    assert out == ["Hello ", "", "ENd of it"]


def test_earliest_of_several_stops_wins_and_tail_is_flushed():
    assert feed_all(["world", "lo w"], ["Hello world"])[:2] == ("Hel", True)
    assert feed_all(["\n\n"], ["a\n"])[:2] == ("a\n", False)
    assert feed_all(None, ["x", "y"])[:2] == ("xy", False)


def test_nothing_after_a_stop():
    m = StopMatcher(["."])
    assert m.feed("One. Two.") == "One" and m.feed("more") == "" and m.flush() == ""


def test_openai_penalties():
    scores = torch.zeros(1, 6)
    ids = torch.tensor([[9, 9, 1, 1, 1, 2]])  # prompt of 2 tokens, then 1,1,1,2
    out = OpenAIPenalties(2, presence=0.5, frequency=1.0, logit_bias={4: 7.0, 0: -100.0})(ids, scores)
    assert out.tolist() == [[-100.0, -3.5, -1.5, 0.0, 7.0, 0.0]]
    assert scores.tolist() == [[0.0] * 6]  # input left untouched


@pytest.mark.parametrize("value,expected", [
    ("abc:0", ("abc", 0)), ("a-b_C9:12", ("a-b_C9", 12)), (None, None), ("", None)])
def test_parse_last_event_id(value, expected):
    assert parse_last_event_id(value) == expected


@pytest.mark.parametrize("value", ["abc", "abc:", ":3", "abc:-1", "abc:01", "a b:1", "abc:1:2",
                                   "x" * 129 + ":1"])
def test_malformed_last_event_id_is_400(value):
    with pytest.raises(APIError) as e:
        parse_last_event_id(value)
    assert e.value.status == 400


def test_body_digest_ignores_session_id_and_key_order():
    a = body_digest({"messages": [1], "stream": True, "session_id": "x"})
    assert a == body_digest({"stream": True, "messages": [1]})
    assert a != body_digest({"stream": False, "messages": [1]})


# --- the reasoning split ------------------------------------------------------------------------

from decoding import ReasoningParser, prompt_opens_thinking  # noqa: E402


def split(pieces, starts_in_reasoning=False):
    p = ReasoningParser(starts_in_reasoning)
    out = [part for piece in pieces for part in p.feed(piece)] + p.flush()
    reasoning = "".join(t for k, t in out if k == "reasoning")
    content = "".join(t for k, t in out if k == "content")
    return reasoning, content


@pytest.mark.parametrize("pieces", [
    ["<think>\nI ponder.\n</think>\n\nThe answer."],
    ["<thi", "nk>\nI pon", "der.\n</th", "ink>", "\n\nThe ", "answer."],
    list("<think>\nI ponder.\n</think>\n\nThe answer."),  # one character at a time
])
def test_think_tags_split_anywhere(pieces):
    assert split(pieces) == ("I ponder.\n", "The answer.")


def test_template_opened_think_block():
    # The prompt ended with "<think>\n": output starts inside the block, with no opening tag.
    assert split(["I pon", "der.</thi", "nk>Yes."], starts_in_reasoning=True) == ("I ponder.", "Yes.")


def test_missing_close_tag_leaves_everything_reasoning():
    assert split(["still thinking </thi"], starts_in_reasoning=True) == ("still thinking </thi", "")


def test_no_think_block_is_all_content():
    assert split(["Hello ", "<think> is just text here"]) == ("", "Hello <think> is just text here")
    assert split(["<", "b>bold</b>"]) == ("", "<b>bold</b>")


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")
