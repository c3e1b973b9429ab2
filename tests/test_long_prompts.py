"""Long (chunked) and weighted prompts in the SDXL prompt encoder, on the tiny text encoders.

The tiny tokenizers are byte-level with no merges: every non-space character is one token (spaces only mark
word ends), so "75 tokens" below is 75 letters, and chunk boundaries can be checked by hand.
"""

from __future__ import annotations

import pytest
import torch

from deployments.instantid.prompt_syntax import parse_weighted_prompt, uses_weighting_syntax
from deployments.instantid.text import SDXLPromptEncoder

CHUNK = 77
BODY = 75


def words(letter: str, tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens: words of five letters (and a shorter last one)."""
    text = letter * tokens
    return " ".join(text[i : i + 5] for i in range(0, tokens, 5))


def old_encode(encoder: SDXLPromptEncoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder before long prompts (and diffusers' SDXL encode_prompt): one 77-token row per text."""
    parts, pooled = [], None
    with torch.no_grad():
        for index, (tokenizer, model) in enumerate(zip(encoder.tokenizers, encoder.encoders, strict=True)):
            ids = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            output = model(ids, output_hidden_states=True)
            parts.append(output.hidden_states[-2])
            if index == 1:
                pooled = output[0]
    assert pooled is not None
    return torch.cat(parts, dim=-1).float(), pooled.float()


def token_count(encoder: SDXLPromptEncoder, text: str) -> int:
    return len(encoder.tokenizers[0](text, add_special_tokens=False)["input_ids"])


# --- the parser -------------------------------------------------------------------------------------------------


def test_parser_basic_syntax() -> None:
    assert parse_weighted_prompt(r"a (b) [c] (d:1.3) \(e\)") == [
        ("a ", 1.0),
        ("b", pytest.approx(1.1)),
        (" ", 1.0),
        ("c", pytest.approx(1 / 1.1)),
        (" ", 1.0),
        ("d", pytest.approx(1.3)),
        (" (e)", 1.0),  # escaped brackets are literal text, merged with the space before them
    ]


def test_parser_nesting_and_explicit_weights() -> None:
    assert parse_weighted_prompt("((x))") == [("x", pytest.approx(1.21))]
    assert parse_weighted_prompt("(x:0.5)") == [("x", 0.5)]
    assert parse_weighted_prompt("((x:1.5))") == [("x", pytest.approx(1.65))]
    assert parse_weighted_prompt("[[x]]") == [("x", pytest.approx(1 / 1.21))]
    assert parse_weighted_prompt("(x: 1.5 )") == [("x", 1.5)]  # whitespace around the number, as current A1111
    # A1111's own doctest, float for float.
    assert parse_weighted_prompt("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ]
    assert parse_weighted_prompt("(unnecessary)(parens)") == [("unnecessaryparens", pytest.approx(1.1))]


def test_parser_unbalanced_and_odd_input() -> None:
    assert parse_weighted_prompt("(unbalanced") == [("unbalanced", pytest.approx(1.1))]
    assert parse_weighted_prompt("a [b") == [("a ", 1.0), ("b", pytest.approx(1 / 1.1))]
    assert parse_weighted_prompt("a ) b ] c") == [("a ) b ] c", 1.0)]  # closers with nothing open: literal
    assert parse_weighted_prompt("x:1.3) y") == [("x:1.3) y", 1.0)]  # ":N)" with no "(" open: literal
    assert parse_weighted_prompt("(x:1.2.3)") == [("x:1.2.3", pytest.approx(1.1))]  # A1111 raises here
    assert parse_weighted_prompt(r"\[lit\] \\") == [("[lit] \\", 1.0)]
    assert parse_weighted_prompt("") == [("", 1.0)]
    assert parse_weighted_prompt("()") == [("", 1.0)]
    assert parse_weighted_prompt("a BREAK b") == [("a BREAK b", 1.0)]  # BREAK is plain text here


def test_uses_weighting_syntax() -> None:
    assert not uses_weighting_syntax("a photo of a man, 35mm: grainy")
    assert not uses_weighting_syntax("smile :) ]")
    assert not uses_weighting_syntax("")
    assert uses_weighting_syntax("a (man)")
    assert uses_weighting_syntax("a [man]")
    assert uses_weighting_syntax("(man:1)")  # the brackets go, even though no weight changes
    assert uses_weighting_syntax(r"a \(man\)")


# --- short prompts: exactly as before -------------------------------------------------------------------------------


def test_short_plain_prompts_are_bit_identical_to_the_old_encoder(prompt_encoder: SDXLPromptEncoder) -> None:
    prompts = [words("a", BODY), "a photo of a man, 35mm: grainy :)"]
    negatives = ["", "blurry, lowres"]
    assert token_count(prompt_encoder, prompts[0]) == BODY  # the longest prompt that fits one chunk
    old_hidden, old_pooled = old_encode(prompt_encoder, prompts + negatives)  # the old row order
    new = prompt_encoder.encode(prompts, negatives, True)
    for row, result in enumerate(new):
        assert result.chunks == 1 and result.embeds.shape == (CHUNK, old_hidden.shape[-1])
        assert torch.equal(result.embeds, old_hidden[row])
        assert torch.equal(result.pooled, old_pooled[row])
        assert torch.equal(result.negative_embeds, old_hidden[len(prompts) + row])
        assert torch.equal(result.negative_pooled, old_pooled[len(prompts) + row])


def test_short_prompt_without_cfg_and_zero_negative(prompt_encoder: SDXLPromptEncoder) -> None:
    old_hidden, old_pooled = old_encode(prompt_encoder, ["a portrait"])
    (plain,) = prompt_encoder.encode(["a portrait"], [None], False)
    assert torch.equal(plain.embeds, old_hidden[0]) and torch.equal(plain.pooled, old_pooled[0])
    assert plain.negative_embeds is None and plain.negative_pooled is None
    (cfg,) = prompt_encoder.encode(["a portrait"], [None], True)
    assert torch.equal(cfg.embeds, old_hidden[0])
    assert torch.equal(cfg.negative_embeds, torch.zeros(CHUNK, old_hidden.shape[-1]))
    assert torch.equal(cfg.negative_pooled, torch.zeros_like(old_pooled[0]))


# --- long prompts ---------------------------------------------------------------------------------------------------


def test_two_chunks_are_the_two_halves(prompt_encoder: SDXLPromptEncoder) -> None:
    first, second = words("a", BODY), words("b", BODY)
    prompt = f"{first} {second}"
    assert token_count(prompt_encoder, prompt) == 2 * BODY
    (long,) = prompt_encoder.encode([prompt], [None], False)
    assert long.chunks == 2 and long.embeds.shape[0] == 2 * CHUNK
    # The halves as two one-chunk prompts in one call: the same two rows in the same forward batch.
    halves = prompt_encoder.encode([first, second], [None, None], False)
    assert torch.equal(long.embeds, torch.cat([halves[0].embeds, halves[1].embeds]))
    assert torch.equal(long.pooled, halves[0].pooled)  # pooled from the first chunk
    assert not torch.equal(long.pooled, halves[1].pooled)


def test_one_token_over_makes_a_second_chunk(prompt_encoder: SDXLPromptEncoder) -> None:
    prompt = words("a", BODY + 1)
    (result,) = prompt_encoder.encode([prompt], [None], False)
    assert result.chunks == 2 and result.embeds.shape[0] == 2 * CHUNK
    (exact,) = prompt_encoder.encode([words("a", 2 * BODY)], [None], False)
    assert exact.chunks == 2  # 150 tokens: two chunks, no extra bos/eos chunk as the reference adds


def test_negative_is_padded_with_empty_chunks(prompt_encoder: SDXLPromptEncoder) -> None:
    prompt = f"{words('a', BODY)} {words('b', 10)}"  # 85 tokens: two chunks
    (result,) = prompt_encoder.encode([prompt], ["blurry"], True)
    assert result.chunks == 2
    assert result.embeds.shape == result.negative_embeds.shape == (2 * CHUNK, result.embeds.shape[-1])
    alone = prompt_encoder.encode(["blurry", ""], [None, None], False)
    # Another batch composition than the long prompt's call: equal within float noise (the token states came out
    # exact on our CPU runs; pooled vectors may differ in the last bits, see the batch test below).
    torch.testing.assert_close(result.negative_embeds[:CHUNK], alone[0].embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.negative_embeds[CHUNK:], alone[1].embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.negative_pooled, alone[0].pooled, rtol=0, atol=1e-6)
    assert not torch.allclose(result.negative_embeds[CHUNK:], result.negative_embeds[:CHUNK])

    (zeros,) = prompt_encoder.encode([prompt], [None], True)
    assert torch.equal(zeros.negative_embeds, torch.zeros(2 * CHUNK, result.embeds.shape[-1]))
    assert torch.equal(zeros.negative_pooled, torch.zeros_like(result.pooled))

    # The other way round: a long negative pads the short positive.
    (short,) = prompt_encoder.encode(["blurry"], [prompt], True)
    assert short.chunks == 2 and short.embeds.shape == short.negative_embeds.shape
    torch.testing.assert_close(short.embeds[CHUNK:], alone[1].embeds, rtol=0, atol=1e-6)


def test_batch_of_different_chunk_counts_equals_each_alone(prompt_encoder: SDXLPromptEncoder) -> None:
    prompts = ["a man", f"{words('a', BODY)} {words('b', BODY)} {words('c', 3)}", "(smiling:1.3) woman"]
    negatives = [f"{words('d', BODY)} {words('e', 4)}", None, ""]
    together = prompt_encoder.encode(prompts, negatives, True)
    assert [r.chunks for r in together] == [2, 3, 1]
    for prompt, negative, batched in zip(prompts, negatives, together, strict=True):
        (alone,) = prompt_encoder.encode([prompt], [negative], True)
        assert alone.chunks == batched.chunks
        # Another batch shape may take other matmul kernels: on our CPU runs the token states came out exact
        # but the pooled vectors (the projection matmul) differed by up to 5e-7, hence the 1e-6 allowance.
        for name in ("embeds", "pooled", "negative_embeds", "negative_pooled"):
            torch.testing.assert_close(getattr(batched, name), getattr(alone, name), rtol=0, atol=1e-6)


# --- weights ----------------------------------------------------------------------------------------------------------


def test_weight_one_is_plain_text(prompt_encoder: SDXLPromptEncoder) -> None:
    plain, weighted = prompt_encoder.encode(["a photo of word here", "a photo of (word:1) here"], [None, None], False)
    assert torch.equal(plain.embeds, weighted.embeds) and torch.equal(plain.pooled, weighted.pooled)


@pytest.mark.parametrize("chunk", [0, 1])
@pytest.mark.parametrize(("syntax", "weight"), [("(word:1.5)", 1.5), ("(word)", 1.1), ("[word]", 1 / 1.1)])
def test_weight_moves_only_the_weighted_tokens(
    prompt_encoder: SDXLPromptEncoder, chunk: int, syntax: str, weight: float
) -> None:
    lead = f"{words('a', BODY)} " if chunk else ""  # put the weighted word in the first or the second chunk
    plain_text, weighted_text = f"{lead}x word y", f"{lead}x {syntax} y"
    plain, weighted = prompt_encoder.encode([plain_text, weighted_text], [None, None], False)
    assert plain.chunks == weighted.chunks == chunk + 1
    assert torch.equal(plain.pooled, weighted.pooled)  # weights touch the token states only
    # In the chunk: bos, x, w, o, r, d, y, eos -> "word" is positions 2..5 and the eos is position 7.
    offset = chunk * CHUNK
    word = list(range(offset + 2, offset + 6))
    eos = offset + 7
    changed = (plain.embeds != weighted.embeds).any(dim=-1).nonzero().flatten().tolist()
    assert changed == word
    anchor = plain.embeds[eos]
    for position in word:  # float32 weights: 1.1 is not fp16's 1.0996 (the reference's rounding)
        expected = anchor + (plain.embeds[position] - anchor) * torch.tensor(weight, dtype=torch.float32)
        torch.testing.assert_close(weighted.embeds[position], expected, rtol=1e-6, atol=1e-6)
    # Both encoders' features are weighted (CLIP-L's first, bigG's after).
    widths = [e.config.hidden_size for e in prompt_encoder.encoders]
    delta = (plain.embeds[word[0]] - weighted.embeds[word[0]]).abs()
    assert delta[: widths[0]].max() > 0 and delta[widths[0] :].max() > 0


def test_weighted_negative(prompt_encoder: SDXLPromptEncoder) -> None:
    (result,) = prompt_encoder.encode(["a man"], ["(blurry:0.5)"], True)
    (plain,) = prompt_encoder.encode(["a man"], ["blurry"], True)
    assert torch.equal(result.embeds, plain.embeds)
    changed = (result.negative_embeds != plain.negative_embeds).any(dim=-1).nonzero().flatten().tolist()
    assert changed == list(range(1, 7))  # b, l, u, r, r, y
