"""Unit tests of the pure pieces: decoding, stop sequences, penalties, ids."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

import model
from decoding import IncrementalDecoder, StopMatcher
from formatters import ChatFormatter, CompletionFormatter, ResponsesFormatter
from prepare import body_digest
from routes import parse_last_event_id
from sampling import RowSampler, SamplingParams, row_seed
from schemas import APIError
from store import Session


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


def sampler(**kw) -> RowSampler:
    params = SamplingParams(**{"max_new_tokens": 50, "temperature": 0.0, **kw})
    return RowSampler(params, [9, 9], {5}, row_seed(kw.get("seed"), 0),
                      lambda t: (f"<{t}>", list(f"<{t}>".encode())))


def test_openai_penalties():
    s = sampler(presence_penalty=0.5, frequency_penalty=1.0, logit_bias={4: 7.0, 0: -100.0})
    for token in (1, 1, 1, 2):  # the output so far; the prompt (9, 9) does not count
        s.accept(token)
    scores = torch.zeros(6)
    out = s._process(scores)
    assert out.tolist() == [-100.0, -3.5, -1.5, 0.0, 7.0, 0.0]
    assert scores.tolist() == [0.0] * 6  # input left untouched


def test_repetition_penalty_counts_the_prompt_and_min_tokens_masks_eos():
    s = sampler(repetition_penalty=2.0, min_tokens=1)
    out = s._process(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 9.0, 1.0, 1.0, 1.0, -1.0]))
    assert out[9] == -2.0 and out[5] == float("-inf") and out[0] == 1.0
    s.accept(3)
    assert s._process(torch.zeros(10))[5] == 0.0  # min_tokens reached: EOS allowed


def test_seeded_rows_repeat_and_differ_by_seed():
    logits = torch.zeros(50)  # uniform: every draw is the generator's alone

    def draws(seed):
        s = sampler(temperature=1.0, seed=seed)
        return [s(logits)[0] for _ in range(20)]
    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    assert row_seed(1, 0) == 1 and row_seed(1, 3) == 4 and row_seed(2**63 - 1, 1) == 0


def test_top_k_one_is_greedy_and_logprobs_are_the_raw_distribution():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    token, entry = sampler(temperature=1.5, top_k=1, seed=3, logprobs=2)(logits)
    assert token == 1
    raw = torch.log_softmax(logits, -1)
    assert abs(entry["logprob"] - float(raw[1])) < 1e-6 and entry["token"] == "<1>"
    assert [t["token"] for t in entry["top_logprobs"]] == ["<1>", "<3>"]
    assert entry["bytes"] == list(b"<1>")


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = sampler(temperature=1.0, top_p=0.7, seed=0)
    assert {s(logits)[0] for _ in range(200)} == {0, 1}


def test_extreme_settings_draw_the_most_likely_token_instead_of_raising():
    """top_p that is 0 in float32 and a repetition penalty that overflows the scores leave
    torch.multinomial nothing to draw from (issue 26: a 500); the top token is drawn."""
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert sampler(temperature=1.0, top_p=5e-324, seed=0)(logits)[0] == 1
    s = sampler(temperature=1.0, repetition_penalty=1e-300, seed=0)
    assert s(torch.tensor([0.5, 3.0, 1.0, 2.0, -1.0, 0.1, 0.0, 0.0, 0.0, 0.0]))[0] in range(10)


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


# --- formatters: choices and logprobs ---------------------------------------------------------


def session(request: dict) -> Session:
    return Session(id="s", kind="x", model="m", created=0.0, body_digest="", request=request)


def entry(token: str, lp: float) -> dict:
    return {"token": token, "logprob": lp, "bytes": list(token.encode()),
            "top_logprobs": [{"token": "x", "logprob": -9.0, "bytes": [120]}]}


def test_legacy_logprobs_offsets_follow_the_emitted_text():
    f = CompletionFormatter(session({"prompt": "Hi", "logprobs": 1, "echo": True,
                                     "_echo_texts": ["Hi"]}))
    f.start()
    # two tokens make one character; the next token starts after it
    out = f.delta("é", index=0, logprobs=[entry("\ufffd", -1.0), entry("\ufffd", -0.5)])
    out += f.delta("!", index=0, logprobs=[entry("!", -0.1)])
    lps = [json.loads(d)["choices"][0]["logprobs"] for d, _ in out]
    assert lps[0]["text_offset"] == [2, 3] and lps[1]["text_offset"] == [3]
    assert lps[1]["top_logprobs"] == [{"x": -9.0, "!": -0.1}]  # the sampled token is included
    assert f.live_result(session({}))["choices"][0]["logprobs"]["text_offset"] == [2, 3, 3]


def test_restart_ends_only_the_choices_still_open():
    s = session({"n": 2, "messages": []})
    before = ChatFormatter(s)
    stored = [d for d, _ in before.start() + before.delta("a", index=0)
              + before.choice_finish(0, "stop") + before.delta("b", index=1)]
    after = ChatFormatter(s)  # rebuilt after a restart
    for d in stored:
        after.observe(d)
    end = [d for d, _ in after.finish("interrupted", None)]
    ending = [json.loads(d) for d in end if d != "[DONE]"]
    assert [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in ending] == [
        (1, "interrupted")]
    result = after.result(s, stored + end)
    assert [c["finish_reason"] for c in result["choices"]] == ["stop", "interrupted"]


def test_a_formatter_rebuilt_after_a_restart_continues_calls_and_offsets():
    """Crash continuation appends after stored events: the rebuilt formatter must number the
    next tool call after the stored ones, stream arguments into the open call, and count
    legacy text offsets from the stored text."""
    s = session({"messages": []})
    before = ChatFormatter(s)
    stored = [d for d, _ in before.start() + before.delta("get", "tool_call")
              + before.delta('{"a": ', "tool_arguments")]
    after = ChatFormatter(s)
    for d in stored:
        after.observe(d)
    more = after.delta("1}", "tool_arguments") + after.delta("put", "tool_call")
    calls = [json.loads(d)["choices"][0]["delta"]["tool_calls"][0] for d, _ in more]
    assert calls[0]["index"] == 0 and calls[1]["index"] == 1
    assert calls[1]["id"].endswith("_1")
    result = after.result(s, stored + [d for d, _ in more])
    assert [c["function"]["arguments"] for c in result["choices"][0]["message"]["tool_calls"]] \
        == ['{"a": 1}', ""]

    c = session({"prompt": "Hi", "logprobs": 1, "echo": True, "_echo_texts": ["Hi"]})
    first = CompletionFormatter(c)
    stored = [d for d, _ in first.start() + first.delta("ab", index=0, logprobs=[entry("ab", -1)])]
    again = CompletionFormatter(c)
    for d in stored:
        again.observe(d)
    lp = json.loads(again.delta("!", index=0, logprobs=[entry("!", -0.1)])[0][0])
    assert lp["choices"][0]["logprobs"]["text_offset"] == [4]  # "Hi" + "ab"


def test_responses_sequence_numbers_run_on_across_parts_of_one_append():
    """One sampled token can make several parts (`</think>` then text): the sink asks for all
    their events before it appends them, so their sequence numbers must not restart."""
    s = session({"input": "x"})
    f = ResponsesFormatter(s)
    s.next_index = 5
    out = f.delta("hm", "reasoning") + f.delta("Hi", "content")
    seqs = [json.loads(d)["sequence_number"] for d, _ in out]
    assert seqs == list(range(5, 5 + len(out)))
    s.next_index += len(out)  # appended: the next call numbers from the log again
    assert json.loads(f.delta("!", "content")[0][0])["sequence_number"] == s.next_index
