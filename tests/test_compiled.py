"""The compiled decode step: the static batch cache's bookkeeping (pure tensors), the engine
over it with the real SmolLM2 (token for token the eager engine's output, through dynamo with
no graph break and no recompile after warm-up), inductor's compiled step against the eager
one on a tiny random Llama. The settings through a real server: test_vision_e2e (M-RoPE
positions too)."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import Engine
from kv_cache import BatchCache, CompiledDecode, StaticBatchCache
from model import ModelHandle, load_model, served_model_name
from test_engine import Sink, cache_of, job

# --- bookkeeping, no model ------------------------------------------------------------------

TINY = LlamaConfig(hidden_size=4, num_attention_heads=2, num_key_value_heads=1, head_dim=2,
                   num_hidden_layers=2, intermediate_size=8, vocab_size=16)


class Recorder:
    """A stand-in forward that records what the step passes (pure logic only)."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids, attention_mask, position_ids, cache):
        self.calls.append((input_ids, attention_mask, position_ids))
        return torch.zeros(input_ids.shape[0], 1, TINY.vocab_size)

    def visible(self) -> list[list[int]]:
        """Columns each row of the last call may attend to."""
        mask = self.calls[-1][1][:, 0, 0]
        return [torch.nonzero(row == 0).flatten().tolist() for row in mask]


def static(forward, length: int = 16, sizes=(1, 2, 4)) -> StaticBatchCache:
    return StaticBatchCache(forward, TINY, length, list(sizes), torch.float32, "cpu")


def test_rows_join_right_aligned_and_a_longer_one_moves_the_rest():
    b = static(Recorder())
    b.merge(cache_of(1, 3, 1.0), 1, 3)
    b.merge(cache_of(2, 5, 2.0), 2, 5)  # longer: the live row moves two columns right
    assert (b.pos, b.starts, b.columns) == (5, [2, 0, 0], 5)
    assert b.keys[0][0, 0, 2:5, 0].tolist() == [1, 1, 1]  # (left of a row: masked, stale)
    b.merge(cache_of(1, 2, 3.0), 1, 2)  # shorter: right-aligned at the write column
    assert b.starts == [2, 0, 0, 3]
    assert b.values[1][3, 0, 3:5, 0].tolist() == [4, 4]
    assert b.tokens() == 4 * 5
    with pytest.raises(RuntimeError):
        b.merge(cache_of(1, 2, 9.0), 1, 2)  # no fifth slot


def test_a_step_pads_to_a_batch_size_and_masks_per_row():
    rec = Recorder()
    b = static(rec)
    b.merge(cache_of(1, 3, 1.0), 1, 3)
    b.merge(cache_of(2, 2, 2.0), 2, 2)
    logits = b.step(torch.tensor([[5], [6], [7]]), torch.tensor([[3], [2], [2]]))
    ids, mask, positions = rec.calls[-1]
    assert logits.shape == (3, TINY.vocab_size)
    assert ids.flatten().tolist() == [5, 6, 7, 0] and positions.flatten().tolist() == [3, 2, 2, 0]
    assert mask.shape == (4, 1, 1, 16)  # every column, fixed shape
    # Each row sees its own entries and the new column; the idle slot only the new column.
    assert rec.visible() == [[0, 1, 2, 3], [1, 2, 3], [1, 2, 3], [3]]
    assert b.pos == 4
    assert int(b.write_columns[0]) == 3  # where the model writes this step's keys


def test_keep_moves_rows_to_the_first_slots_and_the_end_compacts():
    rec = Recorder()
    b = static(rec, length=8)
    b.merge(cache_of(1, 6, 1.0), 1, 6)
    b.merge(cache_of(1, 2, 2.0), 1, 2)
    b.keep([1])  # the long row leaves; the short one moves to slot 0
    assert b.starts == [4] and b.keys[0][0, 0, 4:6, 0].tolist() == [2, 2]
    b.step(torch.tensor([[1]]), torch.tensor([[2]]))
    b.step(torch.tensor([[1]]), torch.tensor([[3]]))
    assert b.pos == 8
    b.step(torch.tensor([[1]]), torch.tensor([[4]]))  # at the end: moved to column 0 first
    assert b.starts == [0] and b.pos == 5 and rec.visible() == [[0, 1, 2, 3, 4]]
    assert b.keys[0][0, 0, :2, 0].tolist() == [2, 2]
    assert not b.fits(1, 4, 5) and b.fits(1, 4, 3) and not b.fits(5, 1, 1)
    b.keep([])
    assert b.rows == 0 and b.columns == 0


def test_a_full_static_cache_refuses_the_step():
    b = static(Recorder(), length=4)
    b.merge(cache_of(1, 3, 1.0), 1, 3)
    b.step(torch.tensor([[1]]), torch.tensor([[3]]))
    with pytest.raises(RuntimeError):
        b.step(torch.tensor([[1]]), torch.tensor([[4]]))


# --- the engine over the static cache, real model ---------------------------------------------


def start_engine(compiled: CompiledDecode | None) -> Engine:
    handle = ModelHandle(name=served_model_name())
    load_model(handle)
    eng = Engine(handle, max_queued=16, max_num_seqs=4, max_batch_tokens=65536,
                 compiled=compiled)
    eng.start()
    return eng


def run_alone(eng: Engine, ids: list[int], **kw) -> dict[int, list[int]]:
    j, s = job(eng, ids, **kw)
    eng.submit(j)
    assert s.done.wait(120), "no answer"
    return s.by_choice


@pytest.mark.slow
def test_static_decode_is_token_for_token_the_eager_one():
    """Staggered jobs of different lengths share the static batch (rows join, move right for
    a longer prompt, leave), seeded sampling with n=2 among them; a job too long for the
    static cache waits and runs eagerly: every choice's tokens are those of the eager engine
    running that job alone. Through dynamo with fullgraph (no graph break), compiled once
    per batch size at warm-up and never again while serving. A compiled step that raises
    fails its jobs and turns the compiled decode off."""
    from torch._dynamo.utils import counters

    eager = start_engine(None)
    comp = start_engine(CompiledDecode(max_cache_len=40, batch_sizes=[1, 4], options={
        "backend": "eager", "fullgraph": True, "dynamic": False}))
    try:
        assert comp.static is not None and comp.warm_up_seconds is not None
        graphs = counters["stats"]["unique_graphs"]
        tok = eager.handle.tokenizer
        cases = [
            (tok("The capital of France is")["input_ids"], {"max_new_tokens": 14}),
            (tok("Once upon a time, in a land far away, there lived")["input_ids"],
             {"max_new_tokens": 12, "temperature": 1.0, "seed": 3, "n": 2, "top_p": 0.9}),
            (tok("def fib(n):")["input_ids"], {"max_new_tokens": 18, "ignore_eos": True}),
            (tok("List three colors:")["input_ids"], {"max_new_tokens": 40,
                                                     "ignore_eos": True}),  # eager
        ]
        expected = [run_alone(eager, ids, **kw) for ids, kw in cases]
        sinks = []
        for ids, kw in cases:
            j, s = job(comp, ids, **kw)
            comp.submit(j)
            sinks.append(s)
            threading.Event().wait(0.2)  # staggered: each joins a running batch
        for s in sinks:
            assert s.done.wait(180), "no answer"
        for want, s in zip(expected, sinks):
            assert s.by_choice == want
        assert counters["stats"]["unique_graphs"] == graphs  # no recompile while serving
        again = run_alone(comp, *cases[0][:1], **cases[0][1])  # the static cache again
        assert again == expected[0] and comp.batch is comp.static

        def broken(*args):
            raise RuntimeError("a compiled step that fails")
        comp.static.compiled = broken
        j, s = job(comp, cases[0][0], **cases[0][1])
        comp.submit(j)
        assert s.done.wait(60) and s.final.startswith("failed")
        assert comp.decode == "eager"  # and it stays so: the next job decodes eagerly
        assert run_alone(comp, *cases[0][:1], **cases[0][1]) == expected[0]
    finally:
        eager.stop()
        comp.stop()


# --- inductor: the compiled step against the eager one ---------------------------------------


def test_inductor_step_matches_the_eager_step():
    """A tiny random Llama: logits of one compiled decode step over the static cache equal
    (to float tolerance) those of the eager step over the dynamic cache, for rows of two
    lengths."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=2, intermediate_size=64, vocab_size=64)
    model = LlamaForCausalLM(config).eval()

    def forward(input_ids, attention_mask, position_ids, cache):
        return model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, cache=cache, use_cache=True,
                     logits_to_keep=1).logits

    from transformers import DynamicCache
    prompts = [torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[6, 7, 8]])]
    with torch.inference_mode():
        compiled = StaticBatchCache(forward, config, 32, [2], torch.float32, "cpu",
                                    {"backend": "inductor", "fullgraph": True, "dynamic": False})
        eager = BatchCache(forward)
        for ids in prompts:
            for b in (compiled, eager):
                cache = DynamicCache()
                model(input_ids=ids, cache=cache, use_cache=True)
                b.merge(cache, 1, ids.shape[1])
        for token in (9, 10):
            ids = torch.tensor([[token], [token + 1]])
            positions = torch.tensor([[5], [3]]) + (token - 9)
            got, want = compiled.step(ids, positions), eager.step(ids, positions)
            assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
