"""Prompt weighting syntax, as users bring it from AUTOMATIC1111, the InstantID demo, Replicate and ComfyUI.

The rules are those of A1111's ``parse_prompt_attention`` (which the InstantID reference pipeline,
``pipeline_stable_diffusion_xl_instantid_full.py``, carries over through diffusers' ``lpw_stable_diffusion_xl``):

- ``(text)`` multiplies the weight of ``text`` by 1.1; ``[text]`` divides it by 1.1;
- ``(text:1.3)`` multiplies it by 1.3 (a signed decimal; whitespace around the number is allowed, as in
  current A1111); brackets nest and their factors multiply: ``((text))`` is 1.1 * 1.1 = 1.21,
  ``((text:1.5))`` is 1.5 * 1.1;
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a backslash before anything else is dropped;
- unbalanced brackets never fail: a ``)`` or ``]`` with nothing open is literal text, and a bracket still open at
  the end applies its factor to everything after it (``(unbalanced`` is 1.1); ``:1.3)`` with no ``(`` open is
  literal text;
- everything else is text with weight 1.0; adjacent runs of equal weight are merged.

Our additions and departures, each deliberate: ``BREAK`` is ordinary text (A1111 starts a new 75-token chunk
there; the InstantID reference turns it into the word "BREAK" weighted -1, and ComfyUI has no BREAK); a
``(text:N)`` whose number does not parse (``(x:1.2.3)``, ``(x:.)``; A1111 raises ValueError) keeps ``:N`` as
literal text and closes like a plain ``)``; empty runs are dropped from the result (they have no tokens).
"""

from __future__ import annotations

import re

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# One lexical item per match, tried in this order (the order matters: an escape before a bracket, an explicit
# weight before a plain ")").
_ITEM = re.compile(
    r"""
      (?P<escape>\\[\\()\[\]]?)                # \( \) \[ \] \\ -> the character; a lone backslash -> nothing
    | (?P<open>[(\[])
    | (?P<weighted>:\s*(?P<number>[+-]?[.\d]+)\s*\))   # ":1.3)" closes a round bracket with that factor
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)


def _parse(text: str) -> list[list]:
    """[text, weight] runs, unmerged, in A1111's multiplication order (so the float weights equal A1111's)."""
    runs: list[list] = []
    open_round: list[int] = []  # index into runs where each open "(" began
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ITEM.finditer(text):
        item = match.group(0)
        if match.group("escape") is not None:
            runs.append([item[1:], 1.0])
        elif match.group("open") is not None:
            (open_round if item == "(" else open_square).append(len(runs))
        elif match.group("weighted") is not None and open_round:
            try:
                factor = float(match.group("number"))
            except ValueError:  # "1.2.3", "." ...: the number is text, the ")" closes as a plain one
                runs.append([item[:-1], 1.0])
                factor = ROUND_FACTOR
            scale_from(open_round.pop(), factor)
        elif item == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif item == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:  # text, a ":", or a closing bracket / ":N)" with nothing open: literal
            runs.append([item, 1.0])

    # Brackets left open apply to the end of the prompt, round ones first (as A1111).
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)
    return runs


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """``text`` as (run, weight) pairs, adjacent equal weights merged; never empty (``[("", 1.0)]`` at least).

    >>> parse_weighted_prompt("a (b) [c] (d:1.3)")
    [('a ', 1.0), ('b', 1.1), (' ', 1.0), ('c', 0.9090909090909091), (' ', 1.0), ('d', 1.3)]
    """
    merged: list[tuple[str, float]] = []
    for run_text, weight in _parse(text):
        if not run_text:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + run_text, weight)
        else:
            merged.append((run_text, weight))
    return merged or [("", 1.0)]


def uses_weighting_syntax(text: str) -> bool:
    """Whether the syntax changes anything: some run weighted != 1.0, or brackets/escapes removed from the text.

    False for plain text (including stray ``)`` ``]`` ``:`` which stay literal): such a prompt is encoded as
    the plain tokenizer would encode it. ``(word:1)`` is True (its brackets go) even though no weight changes.
    """
    return parse_weighted_prompt(text) != [(text, 1.0)]
