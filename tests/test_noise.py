"""Noise injection: span provenance, protected regions, determinism, rates."""
from __future__ import annotations

import hashlib
import math
import re
import unicodedata

import numpy as np
import pytest

from reweight_audit.core.errors import AuditError
from reweight_audit.injection.noise import (
    FAMILIES,
    NoiseConfig,
    Noiser,
    known_kinds,
    load_word_list,
    parse_noise_spec,
    protected_regions,
    stable_hash,
    structural_regions,
    vocab_noise_pieces,
    word_spans,
)

VOCAB = ["<|endoftext|>", "<s>", "[CLS]", "Ġthe", "Ġbanana", "▁zorp", "##ing", "Ã¤", "a", "Ġ", "12", "Ġ+", "quux"]
INSERT_KINDS = ["filler", "hedge", "random-word", "random-token", "repeat"]
REPLACE_KINDS = ["typo", "digit"]

# Each template mixes the hard cases; {i} makes responses differ.
TEMPLATES = [
    "We have $x^2 + y^2 = {i}$ so the answer is {i} apples, clearly true.",
    "Display math $$\\int_0^1 f(x)\\,dx = \\frac{{1}}{{2}}$$ then \\(a + b\\) and \\[c d e\\] done here.",
    "Code:\n```python\nfor i in range(10):\n    print(i)\n```\nand inline `x = 1 + 2` stays put, okay now.",
    "Unicode: 数学 是 很 有趣 的 🙂👍🏽 café e\u0301te\u0301 naïve word {i} words.",
    "Windows lines one two\r\nthree four five\r\nsix seven 3.14 eight {i}.",
    "A price of \\$5 and $z$ in \\begin{{align}} p q r \\end{{align}} then more words follow here.",
    "Unterminated math $a b c d and then many words that stay protected {i}",
    "Numbers 1,000 and 2.5 and x2 and H2O and (45) and 7. End of the line.",
    "Quotes \"hello\" and (parenthesised words) and don't stop believing, friend!",
    "Mixed 中文 English 日本語 text with emoji 🎉 and combining a\u0308 b\u0301 c\u0327 marks.",
]


def corpus(n: int = 60) -> list[tuple[str, str]]:
    return [(f"seq-{i}", TEMPLATES[i % len(TEMPLATES)].format(i=i)) for i in range(n)]


def noiser(kinds, **kw) -> Noiser:
    cfg = NoiseConfig(noise=kinds, **kw)
    return Noiser(cfg, VOCAB)


def check_spans(clean: str, inj) -> None:
    """Provenance, ordering and 'never split' checks for one injection."""
    resp = inj.response
    prev_end = -1
    for sp in inj.spans:
        assert resp[sp.start:sp.end] == sp.text, sp
        assert sp.start < sp.end and sp.start >= prev_end  # sorted, non-overlapping
        prev_end = sp.end
        assert sp.kind in FAMILIES
        for pos in (sp.start, sp.end):  # never split CRLF or a base char + combining mark
            if 0 < pos < len(resp):
                assert resp[pos - 1:pos + 1] != "\r\n"
                assert not unicodedata.combining(resp[pos])


def remove_insertions(resp: str, spans) -> str:
    """Undo insertion spans: each was inserted as ' ' + text."""
    out, pos = [], 0
    for sp in spans:
        assert resp[sp.start - 1] == " "
        out.append(resp[pos:sp.start - 1])
        pos = sp.end
    out.append(resp[pos:])
    return "".join(out)


def clean_positions(spans) -> list[int]:
    """Insertion points in clean-text coordinates."""
    shift, out = 0, []
    for sp in spans:
        out.append(sp.start - 1 - shift)
        shift += sp.end - sp.start + 1
    return out


def inside(regions, a: int, b: int | None = None) -> bool:
    """Point a strictly inside a region, or range [a, b) overlapping one."""
    if b is None:
        return any(s < a < e for s, e in regions)
    return any(s < b and a < e for s, e in regions)


# --------------------------------------------------------------------------
# Provenance and protection, every family
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", INSERT_KINDS)
def test_insert_family_provenance_and_protection(kind):
    n = noiser(kind, rate=0.6)
    total = 0
    for sid, clean in corpus():
        inj = n.inject(clean, sid)
        check_spans(clean, inj)
        assert all(sp.kind == kind for sp in inj.spans)
        assert remove_insertions(inj.response, inj.spans) == clean
        regions = structural_regions(clean)
        for p in clean_positions(inj.spans):
            assert not inside(regions, p), (clean, p)
            # At a word boundary: after a word, before whitespace.
            assert not clean[p - 1].isspace() and clean[p].isspace()
        for s, e in protected_regions(clean):
            assert clean[s:e] in inj.response
        if kind == "repeat":
            for sp in inj.spans:
                assert inj.response[:sp.start - 1].split()[-1] == sp.text
        total += len(inj.spans)
    assert total > 50


def _typo_related(orig: str, new: str) -> bool:
    if len(new) == len(orig):
        d = [i for i in range(len(orig)) if orig[i] != new[i]]
        return len(d) == 2 and d[1] == d[0] + 1 and orig[d[0]] == new[d[1]] and orig[d[1]] == new[d[0]]
    short, long_ = (new, orig) if len(new) < len(orig) else (orig, new)
    if len(long_) != len(short) + 1:
        return False
    ok_drop = any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))
    return ok_drop  # a doubled letter is a drop seen from the other side


@pytest.mark.parametrize("kind", REPLACE_KINDS)
def test_replace_family_provenance_and_protection(kind):
    n = noiser(kind, rate=0.8)
    total = 0
    for sid, clean in corpus():
        inj = n.inject(clean, sid)
        check_spans(clean, inj)
        # Rebuild the clean text: the text between spans is verbatim, each span replaced one word.
        pieces, pos = [], 0
        for sp in inj.spans:
            pieces.append(re.escape(inj.response[pos:sp.start]))
            pieces.append("([A-Za-z]+)" if kind == "typo" else r"([0-9][0-9.,]*)")
            pos = sp.end
        pieces.append(re.escape(inj.response[pos:]))
        m = re.fullmatch("".join(pieces), clean, flags=re.S)
        assert m, (clean, inj.response)
        regions = structural_regions(clean)
        numbers = protected_regions(clean)
        for i, sp in enumerate(inj.spans):
            orig = m.group(i + 1)
            a, b = m.span(i + 1)
            assert not inside(regions, a, b)
            if kind == "typo":
                assert len(orig) >= 3 and orig != sp.text and _typo_related(orig, sp.text)
                assert not inside(numbers, a, b)
            else:
                assert len(orig) == len(sp.text)
                diff = [j for j in range(len(orig)) if orig[j] != sp.text[j]]
                assert len(diff) == 1 and sp.text[diff[0]].isdigit()
        for s, e in structural_regions(clean):
            assert clean[s:e] in inj.response
        total += len(inj.spans)
    assert total > 30  # numbers are rarer than words


def test_mixed_kinds_all_families_fire_and_spans_hold():
    n = noiser(",".join(known_kinds()), rate=0.7)
    seen = set()
    for sid, clean in corpus(120):
        inj = n.inject(clean, sid)
        check_spans(clean, inj)
        seen |= {sp.kind for sp in inj.spans}
    assert seen == set(known_kinds())


def test_protected_regions_detection():
    t = "a $x$ b $$y z$$ c \\(p q\\) d \\[r\\] e `co de` f ```\nblock x\n``` g 12.5 h"
    got = [t[s:e] for s, e in protected_regions(t)]
    assert got == ["$x$", "$$y z$$", "\\(p q\\)", "\\[r\\]", "`co de`", "```\nblock x\n```", "12.5"]
    # Escaped dollar is a literal; the real math after it is still found.
    t2 = "costs \\$5 and $x + y$ then"
    assert [t2[s:e] for s, e in structural_regions(t2)] == ["$x + y$"]
    # Unterminated openers protect the rest of the text.
    for t3 in ("one $two three four", "one `two three", "one \\(two three", "a ```\ncode never closed"):
        s, e = structural_regions(t3)[-1]
        assert e == len(t3)
        inj = noiser("filler", rate=1.0).inject(t3, "x")
        assert len(inj.spans) == 1 and all(p <= s for p in clean_positions(inj.spans))
    # Math inside code is code; backticks inside math are math.
    t4 = "`$a` b $`c$ d"
    assert [t4[s:e] for s, e in structural_regions(t4)] == ["`$a`", "$`c$"]


def test_insertion_reads_naturally_and_keeps_crlf():
    inj = noiser("filler", rate=1.0).inject("one two\r\nthree", "id")
    assert inj.response.count("\r\n") == 1
    words = inj.response.split()
    assert words[0] == "one" and "two" in words and words[-1] == "three"
    # Exactly one space before each insertion, and the insertion ends before whitespace.
    for sp in inj.spans:
        assert inj.response[sp.start - 1] == " " and inj.response[sp.end].isspace()


def test_no_eligible_boundary():
    n = noiser("filler,hedge,repeat", rate=1.0)
    for text in ("single", "$a b c$", "```\nx y\n```", "数学是很有趣的"):
        inj = n.inject(text, "x")
        assert inj.response == text and inj.spans == [] and not inj.eligible


def test_digit_only_touches_free_numbers():
    t = "Let $x = 12$ and `y = 34` then 56 apples and x7 and 8th place"
    n = noiser("digit", rate=1.0)
    for i in range(30):
        inj = n.inject(t, f"d{i}")
        assert [sp.text for sp in inj.spans] != []
        assert "$x = 12$" in inj.response and "`y = 34`" in inj.response
        assert "x7" in inj.response and "8th" in inj.response
        assert len(inj.spans) == 1 and len(inj.spans[0].text) == 2 and inj.spans[0].text != "56"
        assert inj.spans[0].text[0] != "0"  # no new leading zero


def test_typo_never_touches_code_numbers_or_short_words():
    t = "An ox is at `variable` and $\\alpha$ with 123 of them, really."
    n = noiser("typo", rate=1.0)
    for i in range(30):
        inj = n.inject(t, f"t{i}")
        assert "`variable`" in inj.response and "$\\alpha$" in inj.response and "123" in inj.response
        for sp in inj.spans:
            assert sp.text.isalpha()
        assert {sp for sp in inj.response.split() if sp in ("An", "ox", "is", "at")} == {"An", "ox", "is", "at"}


# --------------------------------------------------------------------------
# Randomness and config
# --------------------------------------------------------------------------


def test_stable_hash_is_blake2b():
    expect = int.from_bytes(hashlib.blake2b(b"seq-1", digest_size=8).digest(), "little")
    assert stable_hash("seq-1") == expect


def test_determinism_reorder_subset():
    items = corpus(40)
    n1 = noiser("filler,hedge,typo,digit,repeat", rate=0.3, seed=7, clean_frac=0.2)
    a = {sid: n1.inject(t, sid) for sid, t in items}
    n2 = noiser("filler,hedge,typo,digit,repeat", rate=0.3, seed=7, clean_frac=0.2)
    b = {sid: n2.inject(t, sid) for sid, t in reversed(items)}
    c = {sid: n2.inject(t, sid) for sid, t in items[::3]}
    for sid in a:
        assert a[sid] == b[sid]
        if sid in c:
            assert a[sid] == c[sid]
    # A different seed changes something.
    n3 = noiser("filler,hedge,typo,digit,repeat", rate=0.3, seed=8, clean_frac=0.2)
    assert any(n3.inject(t, sid).response != a[sid].response for sid, t in items)


def test_clean_frac_binomial_tolerance():
    # Each sequence is clean with probability p independently, so the count is
    # Binomial(N, p); 4 sigma bounds a false failure below 1e-4 for any seed.
    N, p = 2000, 0.3
    n = noiser("filler", rate=0.5, clean_frac=p, seed=3)
    clean = sum(n.inject("alpha beta gamma delta", f"c{i}").clean for i in range(N))
    assert abs(clean - N * p) <= 4 * math.sqrt(N * p * (1 - p))
    assert sum(noiser("filler", clean_frac=1.0).inject("a b c", f"c{i}").clean for i in range(50)) == 50
    assert sum(noiser("filler", clean_frac=0.0).inject("a b c", f"c{i}").clean for i in range(50)) == 0


def test_clean_frac_does_not_shift_noisy_sequences():
    a = noiser("filler,typo", rate=0.4, clean_frac=0.0, seed=1)
    b = noiser("filler,typo", rate=0.4, clean_frac=0.5, seed=1)
    for sid, t in corpus(30):
        rb = b.inject(t, sid)
        if not rb.clean:
            assert rb.response == a.inject(t, sid).response


def test_rate_statistics():
    # Pure-word text: every gap but the last is eligible, so spans ~ Binomial(gaps, rate).
    text = " ".join(["word"] * 401)
    n = noiser("filler", rate=0.25, seed=0)
    spans = sum(len(n.inject(text, f"r{i}").spans) for i in range(20))
    trials, p = 20 * 400, 0.25
    assert abs(spans - trials * p) <= 4 * math.sqrt(trials * p * (1 - p))


def test_rate_zero_gives_no_spans():
    n = noiser(",".join(known_kinds()), rate=0.0)
    for sid, t in corpus(20):
        inj = n.inject(t, sid)
        assert inj.spans == [] and inj.response == t


def _noise_word_frac(inj) -> float:
    """Share of the final response's words that overlap a span (measured independently)."""
    starts, ends = word_spans(inj.response)
    noise = sum(any(sp.start < e and s < sp.end for sp in inj.spans) for s, e in zip(starts, ends))
    return noise / len(starts)


@pytest.mark.parametrize("kinds", ["filler", "filler,hedge,random-word,repeat,typo,digit"])
@pytest.mark.parametrize("target", [0.05, 0.1, 0.3])
def test_target_frac_within_half_an_event(kinds, target):
    # Greedy stopping at the closest share gives |achieved - target| <= step/2,
    # and one event adding m words moves the share by < m/W (W = clean words):
    # tolerance m_max/(2W), m_max = the longest entry among the kinds (>= 1).
    n = noiser(kinds, target_frac=target, seed=5)
    m_max = max(
        [1] + [len(e.split()) for k in kinds.split(",") if FAMILIES[k].word_list for e in load_word_list(FAMILIES[k].word_list)]
    )
    rng = np.random.default_rng(0)
    words = load_word_list("random_words.txt")
    tot_noise = tot_words = 0
    for i in range(30):
        W = int(rng.integers(60, 200))
        text = " ".join(words[int(j)] if j % 7 else str(j) for j in rng.integers(0, 300, W))
        inj = n.inject(text, f"tf{i}")
        frac = _noise_word_frac(inj)
        assert abs(frac - inj.noise_words / inj.words) < 1e-12
        assert abs(frac - target) <= m_max / (2 * W)
        tot_noise += inj.noise_words
        tot_words += inj.words
    assert abs(tot_noise / tot_words - target) <= m_max / (2 * 60)


def test_config_validation():
    for bad in (-0.1, 1.5, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(AuditError, match="--rate"):
            NoiseConfig(rate=bad)
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(AuditError, match="--target-frac"):
            NoiseConfig(target_frac=bad)
    with pytest.raises(AuditError, match="--clean-frac"):
        NoiseConfig(clean_frac=1.01)
    with pytest.raises(AuditError, match="not both"):
        NoiseConfig(rate=0.1, target_frac=0.1)
    with pytest.raises(AuditError, match="--seed"):
        NoiseConfig(seed=-1)
    assert NoiseConfig(rate=0).effective_rate == 0 and NoiseConfig(rate=1).effective_rate == 1
    assert NoiseConfig().effective_rate == 0.1


def test_parse_noise_spec():
    assert parse_noise_spec("hedge:1, filler:2") == {"filler": 2.0, "hedge": 1.0}
    assert list(parse_noise_spec("typo,filler")) == ["filler", "typo"]  # registry order
    assert parse_noise_spec("random_word") == {"random-word": 1.0}
    assert set(parse_noise_spec("all")) == set(known_kinds())
    with pytest.raises(AuditError) as exc:
        parse_noise_spec("filler,bogus")
    msg = str(exc.value)
    assert "bogus" in msg and all(k in msg for k in known_kinds()) and "\n" not in msg
    for bad in ("", "filler:x", "filler,filler", "filler:-1", "filler:0", "filler:nan"):
        with pytest.raises(AuditError):
            parse_noise_spec(bad)
    with pytest.raises(AuditError, match="known kinds"):
        NoiseConfig(noise={"nope": 1.0})


def test_random_token_needs_vocab():
    with pytest.raises(AuditError, match="tokenizer"):
        Noiser(NoiseConfig(noise="random-token"), None)
    with pytest.raises(AuditError, match="tokenizer"):
        Noiser(NoiseConfig(noise="random-token"), ["<s>", "12", "Ġ+"])
    assert vocab_noise_pieces(VOCAB) == ["banana", "ing", "quux", "the", "zorp"]


def test_weights_steer_kind_mix():
    text = " ".join(["word"] * 2001)
    counts = {"filler": 0, "hedge": 0}
    for sp in noiser("filler:3,hedge:1", rate=1.0).inject(text, "w").spans:
        counts[sp.kind] += 1
    share = counts["filler"] / 2000
    assert abs(share - 0.75) <= 4 * math.sqrt(0.75 * 0.25 / 2000)


def test_word_lists_load():
    assert {"umm", "you know", "I mean"} <= set(load_word_list("filler.txt"))
    assert {"essentially", "kind of"} <= set(load_word_list("hedge.txt"))
    rw = load_word_list("random_words.txt")
    assert len(rw) >= 200 and len(set(rw)) == len(rw) and all(w.isalpha() for w in rw)
    with pytest.raises(AuditError, match="missing"):
        load_word_list("no_such_list.txt")


def test_word_spans_matches_regex():
    for _, t in corpus(20):
        starts, ends = word_spans(t)
        assert [t[s:e] for s, e in zip(starts, ends)] == re.findall(r"\S+", t)
    weird = "a\u00a0b\u3000c\u2028d\x1ce\u200bf"  # NBSP, ideographic space, line sep, FS, ZWSP (not space)
    starts, ends = word_spans(weird)
    assert [weird[s:e] for s, e in zip(starts, ends)] == re.findall(r"\S+", weird)


def test_long_response_injects_and_holds():
    # Correctness on a long input (speed is measured by hand, not asserted here).
    text = " ".join(TEMPLATES[i % len(TEMPLATES)].format(i=i) for i in range(2000))
    inj = noiser("filler,typo,digit", rate=0.2).inject(text, "long")
    check_spans(text, inj)
    assert len(inj.spans) > 1000
