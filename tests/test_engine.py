"""The batching engine in-process: the padded batch cache (pure tensors) and, with the real
SmolLM2 model, failure isolation and batch-independent output at the engine's own seam."""

from __future__ import annotations

import threading
from pathlib import Path
import time

import pytest
import torch
from transformers import DynamicCache

from decoding import token_piece
from engine import Engine, GenerationJob, Resume
from kv_cache import BatchCache
import model
from model import ModelHandle, embedded_model_dir, gguf_metadata, load_model, served_model_name
from sampling import SamplingParams

# --- the padded batch cache -------------------------------------------------------------------


def cache_of(rows: int, length: int, fill: float, layers: int = 2) -> DynamicCache:
    cache = DynamicCache()
    for i in range(layers):
        kv = torch.full((rows, 1, length, 2), fill + i)
        cache.update(kv, kv.clone(), i)
    return cache


def test_merge_pads_the_shorter_side_on_the_left_and_keep_trims():
    b = BatchCache(forward=None)
    b.merge(cache_of(1, 3, 1.0), 1, 3)
    b.merge(cache_of(2, 5, 2.0), 2, 5)  # longer: the old row is padded
    assert b.mask.tolist() == [[0, 0, 1, 1, 1], [1] * 5, [1] * 5]
    keys = b.cache.layers[0].keys
    assert keys.shape == (3, 1, 5, 2)
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]
    b.merge(cache_of(1, 2, 3.0), 1, 2)  # shorter: the new row is padded
    assert b.mask[3].tolist() == [0, 0, 0, 1, 1]
    assert b.cache.layers[1].keys[3, 0, :, 0].tolist() == [0, 0, 0, 4, 4]
    b.keep([0, 3])  # drop the long rows: two leading columns are padding everywhere
    assert b.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert b.cache.layers[0].keys.shape == (2, 1, 3, 2)
    b.keep([])
    assert b.cache is None and b.tokens() == 0


def test_truncate_undoes_a_partial_step():
    b = BatchCache(forward=None)
    b.merge(cache_of(2, 4, 1.0), 2, 4)
    b.cache.layers[0].keys = torch.cat([b.cache.layers[0].keys, b.cache.layers[0].keys[:, :, :1]],
                                       dim=2)
    b.cache.layers[0].values = b.cache.layers[0].keys.clone()
    b.truncate(4)
    assert all(layer.keys.shape[2] == 4 for layer in b.cache.layers)


# --- the engine with the real model -----------------------------------------------------------


class Sink:
    def __init__(self):
        self.text, self.tokens, self.done, self.final = [], [], threading.Event(), None
        self.by_choice: dict[int, list[int]] = {}  # token ids per choice, as delivered
        self.seeds: dict[int, int] = {}

    def started(self, prompt_tokens):
        pass

    def delta(self, index, parts, completion_tokens, logprobs, tokens, seed):
        self.text.extend(text for _, text in parts)
        self.tokens.extend(tokens)
        self.by_choice.setdefault(index, []).extend(tokens)
        self.seeds[index] = seed

    def choice_finished(self, index, reason, parts, completion_tokens, reasoning_tokens,
                        logprobs, tokens):
        self.text.extend(text for _, text in parts)
        self.tokens.extend(tokens)
        self.by_choice.setdefault(index, []).extend(tokens)

    def finished(self, reason, prompt_tokens, completion_tokens, reasoning_tokens=0):
        self.final, self.completion_tokens = reason, completion_tokens
        self.done.set()

    def failed(self, message):
        self.final = "failed: " + message
        self.done.set()


@pytest.fixture(scope="module")
def engine():
    handle = ModelHandle(name=served_model_name())
    load_model(handle)
    assert handle.state == "ready", handle.error
    eng = Engine(handle, max_queued=8, max_num_seqs=8, max_batch_tokens=8192)
    eng.start()
    yield eng
    eng.stop()


def eventually(check, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def job(engine, ids: list[int], **kw) -> tuple[GenerationJob, Sink]:
    t = torch.tensor([ids])
    sink = Sink()
    params = SamplingParams(**{"max_new_tokens": 16, "temperature": 0.0, **kw})
    return GenerationJob("j", threading.Event(), {"input_ids": t,
                                                  "attention_mask": torch.ones_like(t)},
                         params, sink), sink


def test_a_failing_job_fails_alone(engine):
    tok = engine.handle.tokenizer
    ids = tok("The capital of France is")["input_ids"]
    good, good_sink = job(engine, ids)
    engine.submit(good)
    assert good_sink.done.wait(60)
    alone = "".join(good_sink.text)

    vocab = engine.handle.model.get_input_embeddings().weight.shape[0]
    bad, bad_sink = job(engine, [vocab + 5])  # out of the embedding table: prefill raises
    other, other_sink = job(engine, ids)
    long, long_sink = job(engine, tok("Once upon a time")["input_ids"], max_new_tokens=40)
    engine.submit(long)
    engine.submit(bad)
    engine.submit(other)
    for s in (bad_sink, other_sink, long_sink):
        assert s.done.wait(60)
    assert bad_sink.final.startswith("failed: generation failed in session j")
    assert "".join(other_sink.text) == alone
    assert long_sink.final == "length"
    assert engine.stats()["running"] == 0 and engine.stats()["kv_cache_usage"] == 0


def test_budget_holds_a_job_until_room(engine):
    tok = engine.handle.tokenizer
    ids = tok("Count: 1, 2, 3,")["input_ids"]
    # each reserves more than half the budget (prompt + max_new_tokens)
    a, sa = job(engine, ids, max_new_tokens=5000, ignore_eos=True)
    b, sb = job(engine, ids, max_new_tokens=5000, ignore_eos=True)
    engine.submit(a)
    engine.submit(b)
    assert eventually(lambda: engine.stats()["running"] == 1)
    assert engine.stats()["waiting"] == 1
    a.cancel.set()
    assert sa.done.wait(30) and sa.final == "cancelled"
    assert eventually(lambda: engine.stats()["running"] == 1 and not engine.waiting)
    b.cancel.set()
    assert sb.done.wait(30)


def test_a_resumed_job_continues_token_for_token(engine):
    """GenerationJob.resume (continuation after a crash): prompt + the first k delivered tokens
    re-prefilled, sampler and text pipeline replayed, and the rest comes out as in one run:
    greedy, and seeded sampling with penalties (per-token seeds), for each choice of n=2."""
    tok = engine.handle.tokenizer
    ids = tok("Once upon a time, in a land far away,")["input_ids"]
    for kw in ({}, {"temperature": 1.0, "seed": 7, "n": 2, "frequency_penalty": 0.5,
                    "top_p": 0.9}):
        whole, ws = job(engine, ids, max_new_tokens=24, **kw)
        engine.submit(whole)
        assert ws.done.wait(60) and ws.final == "length"
        for k in (1, 9, 20):
            resume = Resume(tokens={c: t[:k] for c, t in ws.by_choice.items()},
                            seeds=dict(ws.seeds))
            part, ps = job(engine, ids, max_new_tokens=24, **kw)
            part.resume = resume
            engine.submit(part)
            assert ps.done.wait(60) and ps.final == "length"
            for c, tokens in ws.by_choice.items():
                assert tokens[:k] + ps.by_choice[c] == tokens, (kw, k, c)
    # A finished choice is only counted; the other goes on.
    done_resume = Resume(tokens={1: ws.by_choice[1][:5]}, seeds=dict(ws.seeds),
                         done={0: ("length", 24, 0)})
    part, ps = job(engine, ids, max_new_tokens=24, **kw)
    part.resume = done_resume
    engine.submit(part)
    assert ps.done.wait(60) and ps.final == "length" and 0 not in ps.by_choice
    assert ws.by_choice[1][:5] + ps.by_choice[1] == ws.by_choice[1]
    assert ps.completion_tokens == 48


def test_logprob_bytes_join_a_character_split_across_tokens(engine):
    tok = engine.handle.tokenizer
    text = "é! 日本"
    pieces = [token_piece(tok, i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    assert b"".join(bytes(raw) for _, raw in pieces) == text.encode("utf-8")
    assert any(t == "\ufffd" for t, _ in pieces)  # some token is only part of a character


def test_converted_gguf_weights_load_as_the_gguf_does(tmp_path, monkeypatch, caplog):
    """The first start converts the GGUF and caches its float32 weights (model.safetensors);
    later starts load that copy, tensor for tensor the same. A damaged copy is ignored
    (logged): that start converts the GGUF again and rewrites it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory = embedded_model_dir()
    cached = Path(model.gguf_cache_dir(directory, model.EMBEDDED_GGUF))
    gguf_metadata(directory, model.EMBEDDED_GGUF)
    (cached / model.GGUF_WEIGHTS).write_bytes(b"not safetensors")
    conversions = []
    real_cache = model.cache_gguf_weights  # called after each conversion of the GGUF
    monkeypatch.setattr(model, "cache_gguf_weights",
                        lambda *a: (conversions.append(1), real_cache(*a)))
    from_gguf = ModelHandle(name="a")
    load_model(from_gguf)  # the damaged copy is refused, the GGUF converted
    assert from_gguf.state == "ready", from_gguf.error
    assert "ignoring the converted GGUF weights" in caplog.text and conversions == [1]
    assert (cached / model.GGUF_WEIGHTS).stat().st_size > 100_000_000
    from_copy = ModelHandle(name="b")
    load_model(from_copy)
    assert from_copy.state == "ready" and conversions == [1]  # the copy, not the GGUF
    expected = from_gguf.model.state_dict()
    loaded = from_copy.model.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)
    tied = from_copy.model.lm_head.weight, from_copy.model.model.embed_tokens.weight
    assert tied[0].data_ptr() == tied[1].data_ptr()
    (cached / model.GGUF_WEIGHTS).unlink()  # 540 MB that pytest would keep for three runs


def test_converted_gguf_metadata_matches_the_gguf(engine, tmp_path, monkeypatch):
    """The config and tokenizer cached in HF format (model.gguf_metadata) behave as the GGUF's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory, gguf = embedded_model_dir(), model.EMBEDDED_GGUF
    fresh = gguf_metadata(directory, gguf)  # parses the GGUF, writes the cache
    assert list((tmp_path / "resumable").iterdir())
    cached = gguf_metadata(directory, gguf)  # reads the cache
    def settings_of(config):
        return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    for config, tokenizer in (fresh, cached):
        assert settings_of(config) == settings_of(fresh[0])
        assert tokenizer.get_vocab() == engine.handle.tokenizer.get_vocab()
        assert tokenizer.chat_template == engine.handle.tokenizer.chat_template
        text = "Hello wörld 日本 <|im_end|>"
        assert tokenizer(text)["input_ids"] == engine.handle.tokenizer(text)["input_ids"]
        assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (
            engine.handle.tokenizer.eos_token_id, engine.handle.tokenizer.pad_token_id)
