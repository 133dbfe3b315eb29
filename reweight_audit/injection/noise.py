"""Noise injection: the families, the protected regions, the per-sequence RNG.

Pure logic: text in, noisy text and span labels out (``response[start:end] ==
text`` always). The only file access is reading the word lists shipped in
``reweight_audit.data``. The conventions (words, slots, rate and target
modes, protected regions, offsets) are recorded in the inject manifest and
written out in ``docs/design.md``, "Noise injection".
"""
from __future__ import annotations

import bisect
import hashlib
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.core.registry import Registry

DEFAULT_RATE = 0.1
#: Every family that needs no tokenizer.
DEFAULT_NOISE = "filler,hedge,random-word,repeat,typo,digit"
#: The ``--noise`` value that injects nothing (spans that came with the corpus pass through).
NO_NOISE = "none"

WORD_UNIT = "whitespace-separated words of the response (\\S+ runs)"
OFFSET_UNIT = "Python str indices (Unicode code points) into the final response"

# --------------------------------------------------------------------------
# Protected regions
# --------------------------------------------------------------------------

# One alternation finds the next opener; the matching closer is then found
# with str.find, so the scan is a single left-to-right pass.
# The leading lookahead lets the engine skip ordinary characters with one
# class test instead of trying every alternative at every position (4x faster).
_OPEN_RE = re.compile(
    r"(?=[`$\\])(?:"
    r"(?P<tick>`+)"
    r"|(?P<dd>\$\$)"
    r"|(?P<d>\$)"
    r"|(?P<paren>\\\()"
    r"|(?P<brack>\\\[)"
    r"|(?P<env>\\begin\{(?P<envname>[A-Za-z]+\*?)\})"
    r")"
)
_NUM_RE = re.compile(r"\d+(?:[.,]\d+)*")
_ASCII_DIGITS = "0123456789"
_OPEN_PUNCT = "\"'([{\u201c\u2018\u00ab"
_CLOSE_PUNCT = ".,;:!?\"')]}\u201d\u2019\u00bb\u2026"
_TYPO_CORE_RE = re.compile(r"[A-Za-z]{3,}")


def _escaped(text: str, i: int) -> bool:
    """True when text[i] is preceded by an odd number of backslashes."""
    n = 0
    i -= 1
    while i >= 0 and text[i] == "\\":
        n += 1
        i -= 1
    return n % 2 == 1


def _find_unescaped(text: str, needle: str, pos: int) -> int:
    """Index of the next ``needle`` at or after ``pos`` not escaped by a backslash, or -1."""
    i = text.find(needle, pos)
    while i != -1 and _escaped(text, i):
        i = text.find(needle, i + 1)
    return i


def structural_regions(text: str) -> list[tuple[int, int]]:
    """Sorted, disjoint ``[start, end)`` ranges of LaTeX math and code.

    Covers ``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``,
    ``\\begin{env}...\\end{env}``, fenced code blocks and inline code.
    ``\\$`` is a literal dollar. An unterminated opener protects the rest
    of the text (the safe reading).
    """
    regions: list[tuple[int, int]] = []
    n = len(text)
    pos = 0
    while pos < n:
        m = _OPEN_RE.search(text, pos)
        if m is None:
            break
        start = m.start()
        group = m.lastgroup
        if group == "envname":  # lastgroup reports the inner group
            group = "env"
        if group != "tick" and _escaped(text, start):
            # \$ is a literal dollar, \\( is a backslash then "(": not openers.
            pos = start + 1
            continue
        if group == "tick":
            run = m.group("tick")
            j = text.find(run, m.end())
            end = n if j == -1 else j + len(run)
        elif group == "dd":
            j = _find_unescaped(text, "$$", m.end())
            end = n if j == -1 else j + 2
        elif group == "d":
            j = _find_unescaped(text, "$", m.end())
            end = n if j == -1 else j + 1
        elif group == "paren":
            j = _find_unescaped(text, "\\)", m.end())
            end = n if j == -1 else j + 2
        elif group == "brack":
            j = _find_unescaped(text, "\\]", m.end())
            end = n if j == -1 else j + 2
        else:
            closer = "\\end{" + m.group("envname") + "}"
            j = text.find(closer, m.end())
            end = n if j == -1 else j + len(closer)
        regions.append((start, end))
        pos = end
    return regions


def _numbers_outside(text: str, regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Number spans that do not overlap a structural region (one merged walk)."""
    out: list[tuple[int, int]] = []
    r = 0
    nreg = len(regions)
    for m in _NUM_RE.finditer(text):
        s, e = m.span()
        while r < nreg and regions[r][1] <= s:
            r += 1
        if r < nreg and regions[r][0] < e:
            continue
        out.append((s, e))
    return out


def merge_regions(regions: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``[start, end)`` ranges covering the same characters as ``regions``."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(regions):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def protected_regions(text: str, *, numbers: bool = True) -> list[tuple[int, int]]:
    """All protected ``[start, end)`` ranges: math, code and (optionally) numbers."""
    regions = structural_regions(text)
    if numbers:
        regions = sorted(regions + _numbers_outside(text, regions))
    return regions


# --------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------


def stable_hash(seq_id: str) -> int:
    """A 64-bit hash of a sequence id that is the same in every process (not ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(seq_id.encode("utf-8"), digest_size=8).digest(), "little")


def sequence_rng(seed: int, seq_id: str) -> np.random.Generator:
    """The RNG for one sequence: depends only on ``(seed, id)``, not on corpus order."""
    return np.random.default_rng([seed, stable_hash(seq_id)])


# --------------------------------------------------------------------------
# Word lists and vocabulary pieces
# --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def load_word_list(filename: str) -> tuple[str, ...]:
    """Entries of ``data/<filename>``: one per line, blank lines and ``#`` comments skipped."""
    try:
        raw = resources.files("reweight_audit.data").joinpath(filename).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise AuditError(
            f"data/{filename}: word list missing or unreadable ({exc}); reinstall reweight-audit"
        ) from None
    entries = tuple(
        " ".join(line.split()) for line in raw.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )
    if not entries:
        raise AuditError(f"data/{filename}: word list is empty; add one entry per line")
    return entries


_PIECE_MARKERS = ("\u0120", "\u2581", "##")  # 'Ġ' (byte-level BPE), '▁' (SentencePiece), '##' (WordPiece)
_SPECIAL_PIECE_RE = re.compile(r"^(<[^>]*>|\[[^\]]*\])$")


def vocab_noise_pieces(pieces: Iterable[str]) -> list[str]:
    """Usable ``random-token`` pieces from a tokenizer vocabulary.

    Keeps non-special pieces that, stripped of a leading space marker, are
    2-20 ASCII letters (so they decode as themselves and read as one word).
    Sorted and deduplicated so the result does not depend on vocabulary order.
    """
    out: set[str] = set()
    for piece in pieces:
        if not isinstance(piece, str) or _SPECIAL_PIECE_RE.match(piece):
            continue
        q = piece
        for marker in _PIECE_MARKERS:
            if q.startswith(marker):
                q = q[len(marker):]
                break
        if 2 <= len(q) <= 20 and q.isascii() and q.isalpha():
            out.add(q)
    return sorted(out)


# --------------------------------------------------------------------------
# Families (registry)
# --------------------------------------------------------------------------


# str.isspace() (which is what \s means for str patterns) as a code-point table;
# no whitespace code point lies above U+3000.
_WS_TABLE = np.array([chr(c).isspace() for c in range(0x3001)], dtype=bool)


def word_spans(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of the words (``\\S+`` runs) of ``text``, vectorised."""
    if not text:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    ws = _WS_TABLE[np.minimum(cp, 0x3000)] & (cp <= 0x3000)
    word = np.empty(len(cp) + 2, dtype=np.int8)
    word[0] = word[-1] = 0
    word[1:-1] = ~ws
    edges = np.diff(word)
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


class _Slots:
    """One response, analysed once: words, structural regions, numbers, open gaps."""

    __slots__ = ("text", "starts", "ends", "reg_starts", "reg_ends", "num_starts", "nums", "gap")

    def __init__(self, text: str, keep: Sequence[tuple[int, int]] = ()) -> None:
        self.text = text
        starts, ends = word_spans(text)
        # Spans that came with the corpus are protected like math and code: no edit lands inside one.
        regions = structural_regions(text)
        if keep:
            regions = merge_regions(regions + [(s, e) for s, e in keep])
        rs = np.array([s for s, _ in regions], dtype=np.int64)
        re_ = np.array([e for _, e in regions], dtype=np.int64)
        # Gap after word k is [ends[k], starts[k+1]); it is open when no region overlaps it.
        a, b = ends[:-1], starts[1:]
        if len(rs):
            i = np.searchsorted(rs, a, side="right") - 1
            hit_prev = (i >= 0) & (re_[np.maximum(i, 0)] > a)
            nxt = np.minimum(i + 1, len(rs) - 1)
            hit_next = (i + 1 < len(rs)) & (rs[nxt] < b)
            open_gap = ~(hit_prev | hit_next)
        else:
            open_gap = np.ones(len(a), dtype=bool)
        self.gap = open_gap.tolist() + [False] if len(starts) else []
        self.starts = starts.tolist()
        self.ends = ends.tolist()
        self.reg_starts = rs.tolist()
        self.reg_ends = re_.tolist()
        self.nums = _numbers_outside(text, regions)
        self.num_starts = [s for s, _ in self.nums]

    def __len__(self) -> int:
        return len(self.starts)

    def overlaps(self, a: int, b: int) -> bool:
        """Does ``[a, b)`` (b > a) overlap a structural region?"""
        i = bisect.bisect_right(self.reg_starts, a) - 1
        if i >= 0 and self.reg_ends[i] > a:
            return True
        return i + 1 < len(self.reg_starts) and self.reg_starts[i + 1] < b

    def gap_ok(self, k: int) -> bool:
        """Can noise be inserted after word k? (a next word exists, the gap is unprotected)"""
        return self.gap[k]

    def word(self, k: int) -> str:
        return self.text[self.starts[k]:self.ends[k]]

    def typo_core(self, k: int) -> tuple[int, int] | None:
        """The ASCII-letter core of word k (punctuation stripped), or None."""
        s, e = self.starts[k], self.ends[k]
        text = self.text
        while s < e and text[s] in _OPEN_PUNCT:
            s += 1
        while e > s and text[e - 1] in _CLOSE_PUNCT:
            e -= 1
        if e - s < 3 or not _TYPO_CORE_RE.fullmatch(text, s, e) or self.overlaps(s, e):
            return None
        return s, e

    def numbers(self, k: int) -> list[tuple[int, int]]:
        """Editable numbers inside word k: not in math/code, not glued to letters, >= 1 ASCII digit."""
        s, e = self.starts[k], self.ends[k]
        i = bisect.bisect_left(self.num_starts, s)
        text = self.text
        out = []
        while i < len(self.nums) and self.nums[i][0] < e:
            ns, ne = self.nums[i]
            i += 1
            # "x2", "3rd", "H2O" are names, not quantities: leave them alone.
            if ns > 0 and (text[ns - 1].isalnum() or text[ns - 1] == "_"):
                continue
            if ne < len(text) and (text[ne].isalnum() or text[ne] == "_"):
                continue
            if any(c in _ASCII_DIGITS for c in text[ns:ne]):
                out.append((ns, ne))
        return out


class _Edit(NamedTuple):
    """Replace clean[start:end] by ``new``; the noise span is new[a:b]."""

    start: int
    end: int
    new: str
    a: int
    b: int
    kind: str
    words_added: int  # words the edit adds to the response
    noise_words: int  # words of the final response that the edit makes noise


@dataclass(frozen=True)
class Family:
    """A registered noise family."""

    name: str
    mode: str  # "insert" or "replace"
    summary: str
    applies: Callable[[_Slots, int], bool]
    # make(slots, k, u, resources): u holds N_UNIFORMS uniforms in [0, 1) for this event;
    # u[0] chose the family, u[1:] are the family's own.
    make: Callable[[_Slots, int, Sequence[float], Mapping[str, Sequence[str]]], _Edit]
    word_list: str | None = None  # data file the family draws from, if any


#: The noise families in registration order, which is the order of the draws' family choice
#: (so it must not change: the same seed gives the same noise).
FAMILIES: Registry[Family] = Registry("noise kind", known_label="known kinds")


def register(
    name: str,
    *,
    mode: str,
    summary: str,
    applies: Callable[[_Slots, int], bool],
    word_list: str | None = None,
) -> Callable:
    """Decorator: register ``make(slots, k, u, resources) -> _Edit`` as family ``name`` (a taken name is an error)."""

    def deco(make: Callable) -> Callable:
        FAMILIES.add(name, Family(name, mode, summary, applies, make, word_list))
        return make

    return deco


def known_kinds() -> list[str]:
    """Registered family names, in registry order."""
    return FAMILIES.names()


def get_family(name: str) -> Family:
    """The family registered as ``name``; an unknown name is an ``AuditError`` with "did you mean" and the known kinds."""
    return FAMILIES.get(name)


#: Uniforms drawn per injection event: family choice plus up to three for the family.
N_UNIFORMS = 4
_TARGET_BLOCK = 4096


def _pick(u: float, items: Sequence):
    """The item a uniform ``u`` in [0, 1) selects."""
    return items[min(int(u * len(items)), len(items) - 1)]


def _insert_after(slots: _Slots, k: int, noise: str, kind: str) -> _Edit:
    n = len(noise.split())
    return _Edit(slots.ends[k], slots.ends[k], " " + noise, 1, 1 + len(noise), kind, n, n)


def _make_list_inserter(kind: str) -> Callable:
    def make(slots: _Slots, k: int, u: Sequence[float], res: Mapping[str, Sequence[str]]) -> _Edit:
        return _insert_after(slots, k, _pick(u[1], res[kind]), kind)

    return make


def _gap_ok(slots: _Slots, k: int) -> bool:
    return slots.gap[k]


register("filler", mode="insert", applies=_gap_ok, word_list="filler.txt",
         summary="a disfluency (umm, uh, er, hmm, you know, I mean)")(_make_list_inserter("filler"))
register("hedge", mode="insert", applies=_gap_ok, word_list="hedge.txt",
         summary="a replaceable discourse word (essentially, basically, kind of, ...)")(_make_list_inserter("hedge"))
register("random-word", mode="insert", applies=_gap_ok, word_list="random_words.txt",
         summary="a common dictionary word unrelated to the text")(_make_list_inserter("random-word"))
register("random-token", mode="insert", applies=_gap_ok,
         summary="a random alphabetic piece of the tokenizer vocabulary")(_make_list_inserter("random-token"))


def _repeat_ok(slots: _Slots, k: int) -> bool:
    # Only plain words: repeating "x," or "3" would duplicate punctuation or a quantity.
    return slots.gap[k] and slots.word(k).isalpha()


@register("repeat", mode="insert", applies=_repeat_ok, summary="a stutter: the previous word again")
def _make_repeat(slots: _Slots, k: int, u: Sequence[float], res: Mapping[str, Sequence[str]]) -> _Edit:
    return _insert_after(slots, k, slots.word(k), "repeat")


def _typo_ok(slots: _Slots, k: int) -> bool:
    return slots.typo_core(k) is not None


@register("typo", mode="replace", applies=_typo_ok,
          summary="an existing word misspelt (swap, drop or double a letter); span = whole word")
def _make_typo(slots: _Slots, k: int, u: Sequence[float], res: Mapping[str, Sequence[str]]) -> _Edit:
    s, e = slots.typo_core(k)  # type: ignore[misc]
    w = slots.text[s:e]
    op = _pick(u[1], ("swap", "drop", "double"))
    if op == "swap":
        swaps = [i for i in range(len(w) - 1) if w[i] != w[i + 1]]
        if swaps:
            i = _pick(u[2], swaps)
            new = w[:i] + w[i + 1] + w[i] + w[i + 2:]
        else:  # "aaa": no swap changes it; drop instead
            op = "drop"
    if op == "drop":
        i = _pick(u[2], range(len(w)))
        new = w[:i] + w[i + 1:]
    elif op == "double":
        i = _pick(u[2], range(len(w)))
        new = w[:i + 1] + w[i:]
    return _Edit(s, e, new, 0, len(new), "typo", 0, 1)


def _digit_ok(slots: _Slots, k: int) -> bool:
    return bool(slots.numbers(k))


@register("digit", mode="replace", applies=_digit_ok,
          summary="one digit of an existing number changed; span = whole number")
def _make_digit(slots: _Slots, k: int, u: Sequence[float], res: Mapping[str, Sequence[str]]) -> _Edit:
    s, e = _pick(u[1], slots.numbers(k))
    num = slots.text[s:e]
    i = _pick(u[2], [j for j, c in enumerate(num) if c in _ASCII_DIGITS])
    # No new leading zero ("45" -> "05" reads as a different notation, not a wrong value).
    choices = [d for d in _ASCII_DIGITS if d != num[i] and not (d == "0" and i == 0 and len(num) > 1)]
    new = num[:i] + _pick(u[3], choices) + num[i + 1:]
    return _Edit(s, e, new, 0, len(new), "digit", 0, 1)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def _known_list() -> str:
    return ", ".join(FAMILIES)


def parse_noise_spec(spec: str) -> dict[str, float]:
    """Parse ``"filler:2,hedge:1"`` (weight defaults to 1; ``all`` = every family).

    Returns kinds in registry order so the spec's order does not change results.
    ``none`` gives no kinds: nothing is injected.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise AuditError(f"--noise: empty noise spec; give kinds such as --noise filler:2,hedge:1 (known: {_known_list()})")
    if spec.strip().lower() == NO_NOISE:
        return {}  # the corpus passes through unchanged, with the spans it brought
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, w = part.partition(":")
        name = name.strip().lower().replace("_", "-")
        if name == "all" and not sep:
            for kind in FAMILIES:
                weights.setdefault(kind, 1.0)
            continue
        if name not in FAMILIES:
            raise AuditError(f"--noise {spec!r}: {FAMILIES.unknown_message(name)}")
        if name in weights:
            raise AuditError(f"--noise {spec!r}: kind {name!r} given twice; list each kind once")
        if sep:
            try:
                weight = float(w)
            except ValueError:
                raise AuditError(
                    f"--noise {spec!r}: weight {w.strip()!r} of {name!r} is not a number; write e.g. {name}:2"
                ) from None
        else:
            weight = 1.0
        weights[name] = weight
    check_noise_weights(weights, where=f"--noise {spec!r}")
    return {k: weights[k] for k in FAMILIES if k in weights}


def check_noise_weights(weights: Mapping[str, float], *, where: str = "--noise") -> None:
    """Weights must name known kinds, be finite and >= 0, and not all be zero."""
    if not weights:
        raise AuditError(f"{where}: no noise kinds given; known kinds: {_known_list()}")
    for name, w in weights.items():
        if name not in FAMILIES:
            raise AuditError(f"{where}: {FAMILIES.unknown_message(name)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise AuditError(f"{where}: weight of {name!r} must be a finite number >= 0, got {w!r}")
    if not any(w > 0 for w in weights.values()):
        raise AuditError(f"{where}: every weight is 0; give at least one kind a positive weight")


def _check_fraction(name: str, value: object, *, allow_one: bool = True) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value
        and (value <= 1 if allow_one else value < 1)
    )
    if not ok:
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise AuditError(f"{name} {value!r}: must be a number in {interval}; e.g. {name} 0.1")


#: Named settings of ``--noise`` and its amount. ``table1``: filler and hedge at the token share of
#: noise that RankTuner's Table 1 implies (4.54% x 10% / 55.33% = 0.82%). A share of words
#: (target mode) rather than a rate, because it varies less between seeds; 2.3% of words gave
#: 0.80%, 0.83% and 0.82% of CHAMP's supervised tokens under the default tokenizer at seeds
#: 0, 1, 2 (``docs/formats.md``, "Presets").
PRESETS: dict[str, dict] = {
    "table1": {"noise": "filler,hedge", "target_frac": 0.023},
}


def preset_settings(preset: str | None, noise: str | None, rate: float | None,
                    target_frac: float | None) -> tuple[str, float | None, float | None]:
    """``(noise, rate, target_frac)`` after applying ``preset``; without one, ``noise`` defaults to DEFAULT_NOISE.

    A preset fixes the noise and its amount, so giving those as well is an error.
    """
    if preset is None:
        return (DEFAULT_NOISE if noise is None else noise), rate, target_frac
    if preset not in PRESETS:
        raise AuditError(f"--preset {preset!r}: unknown preset; known presets: {', '.join(PRESETS)}")
    given = [name for name, value in (("--noise", noise), ("--rate", rate), ("--target-frac", target_frac))
             if value is not None]
    if given:
        raise AuditError(f"--preset {preset} sets --noise and the amount of noise itself; drop {', '.join(given)} or the preset")
    settings = PRESETS[preset]
    return settings["noise"], settings.get("rate"), settings.get("target_frac")


@dataclass(frozen=True)
class NoiseConfig:
    """How to inject noise. Validated on construction (AuditError on bad values).

    ``rate`` and ``target_frac`` are alternatives; with neither, ``rate`` is
    ``DEFAULT_RATE``. ``clean_frac`` is the share of sequences left untouched.
    ``noise="none"`` (an empty mapping) injects nothing. ``preset`` only names
    the preset the values came from (:func:`preset_settings`), for the manifest.
    """

    noise: Mapping[str, float] = field(default_factory=lambda: parse_noise_spec(DEFAULT_NOISE))
    rate: float | None = None
    target_frac: float | None = None
    clean_frac: float = 0.0
    seed: int = 0
    preset: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.noise, str):
            object.__setattr__(self, "noise", parse_noise_spec(self.noise))
        elif self.noise:
            check_noise_weights(self.noise)
            object.__setattr__(self, "noise", {k: float(self.noise[k]) for k in FAMILIES if k in self.noise})
        if self.rate is not None and self.target_frac is not None:
            raise AuditError("--rate and --target-frac: give one or the other, not both")
        if self.rate is not None:
            _check_fraction("--rate", self.rate)
        if self.target_frac is not None:
            _check_fraction("--target-frac", self.target_frac, allow_one=False)
        _check_fraction("--clean-frac", self.clean_frac)
        if self.preset is not None and self.preset not in PRESETS:
            raise AuditError(f"--preset {self.preset!r}: unknown preset; known presets: {', '.join(PRESETS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise AuditError(f"--seed {self.seed!r}: must be a non-negative integer; e.g. --seed 0")

    @property
    def effective_rate(self) -> float | None:
        """The per-site probability in rate mode; None in target mode."""
        if self.target_frac is not None:
            return None
        return DEFAULT_RATE if self.rate is None else float(self.rate)

    def to_dict(self) -> dict:
        """JSON-ready view for the manifest."""
        return {
            "noise": dict(self.noise),
            "mode": "target_frac" if self.target_frac is not None else "rate",
            "rate": self.effective_rate,
            "target_frac": self.target_frac,
            "clean_frac": float(self.clean_frac),
            "seed": int(self.seed),
            "preset": self.preset,
        }


# --------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------


class Span(NamedTuple):
    """One injected span: ``response[start:end] == text``.

    (NamedTuples, not frozen dataclasses: a long response makes ~10^5 of them.)
    """

    start: int
    end: int
    kind: str
    text: str

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "kind": self.kind, "text": self.text}


@dataclass(frozen=True)
class Injection:
    """Result for one response."""

    response: str
    spans: list[Span]  # the injected noise
    clean: bool  # drawn as a clean (untouched) sequence
    eligible: bool  # at least one slot where a configured family applies (False when clean)
    words: int  # words in the final response
    noise_words: int  # of those, words that are noise
    kept: list[Span] = field(default_factory=list)  # the spans given with the response, in final offsets


def apply_edits(text: str, edits: Sequence[_Edit]) -> tuple[str, list[Span]]:
    """Apply non-overlapping edits (sorted by start) in one pass; spans in final offsets."""
    pieces: list[str] = []
    spans: list[Span] = []
    pos = 0
    out_len = 0
    # Offsets are kept as a running length, never by measuring the output so far.
    for start, end, new, a, b, kind, _, _ in edits:
        chunk = text[pos:start]
        out_len += len(chunk)
        spans.append(Span(out_len + a, out_len + b, kind, new[a:b]))
        pieces.append(chunk)
        pieces.append(new)
        out_len += len(new)
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces), spans


def shift_spans(spans: Sequence[Span], edits: Sequence[_Edit]) -> list[Span]:
    """``spans`` of the clean text moved into the text ``apply_edits(text, edits)`` returns.

    No edit may lie inside a span (the noiser protects them), so a span keeps its
    text and moves by d = sum of len(new) - (end - start) over the edits that end
    at or before its start (an insertion exactly at the start goes before it).
    """
    ends = [ed.end for ed in edits]
    deltas = [0]
    for ed in edits:
        deltas.append(deltas[-1] + len(ed.new) - (ed.end - ed.start))
    shifted = []
    for sp in spans:
        d = deltas[bisect.bisect_right(ends, sp.start)]
        shifted.append(Span(sp.start + d, sp.end + d, sp.kind, sp.text))
    return shifted


class Noiser:
    """A validated config with its word lists loaded; ``inject`` is then pure per response."""

    def __init__(self, config: NoiseConfig, vocab_pieces: Sequence[str] | None = None) -> None:
        self.config = config
        self.kinds = [k for k, w in config.noise.items() if w > 0]
        self.weights = {k: float(config.noise[k]) for k in self.kinds}
        # Looked up once: the per-edit loops below index this plain dict.
        self._families = {k: FAMILIES.get(k) for k in self.kinds}
        self._plan = [
            (k, None if fam.applies is _gap_ok else fam.applies, self.weights[k])
            for k, fam in self._families.items()
        ]
        self.resources: dict[str, Sequence[str]] = {}
        for kind, fam in self._families.items():
            if fam.word_list:
                self.resources[kind] = load_word_list(fam.word_list)
        self.vocab_count = 0
        if "random-token" in self.kinds:
            pieces = vocab_noise_pieces(vocab_pieces or [])
            if not pieces:
                raise AuditError(
                    "--noise random-token: needs a tokenizer vocabulary with alphabetic pieces; "
                    "pass --model (or its tokenizer) or drop random-token from --noise"
                )
            self.resources["random-token"] = pieces
            self.vocab_count = len(pieces)

    def _choose(self, slots: _Slots, k: int, u0: float) -> str | None:
        """The family for slot k: weights renormalised over the families that apply there."""
        gap = slots.gap[k]
        kinds: list[str] = []
        cum: list[float] = []
        total = 0.0
        for kd, applies, w in self._plan:
            # Gap-only families need no call: the open-gap flag is precomputed.
            if gap if applies is None else applies(slots, k):
                kinds.append(kd)
                total += w
                cum.append(total)
        if len(kinds) <= 1:
            return kinds[0] if kinds else None
        x = u0 * total
        for kd, c in zip(kinds, cum):
            if x < c:
                return kd
        return kinds[-1]  # float round-off at the top end

    def _any_eligible(self, slots: _Slots) -> bool:
        # Fast path: an open gap settles it for every pure insertion family.
        if any(applies is None for _, applies, _ in self._plan) and any(slots.gap):
            return True
        return any(self._families[kd].applies(slots, k) for k in range(len(slots)) for kd in self.kinds)

    def inject(self, response: str, seq_id: str, keep: Sequence[Span] = ()) -> Injection:
        """Inject noise into one response, seeded by ``(seed, seq_id)``.

        ``keep``: spans that came with the response (offsets into it). No edit
        lands inside one, and they come back in ``Injection.kept`` moved to the
        final offsets. The slots and draws do not depend on them, so a span
        only takes away the events that would have fallen inside it.

        Draw order from ``sequence_rng(seed, id)``: one uniform for the clean
        decision; then (rate mode) one uniform per word selecting slots and
        ``N_UNIFORMS`` per selected slot, or (target mode) a permutation of
        the words and ``N_UNIFORMS`` per examined slot, in blocks.
        """
        rng = sequence_rng(int(self.config.seed), seq_id)
        # Always consume this draw, so changing clean_frac never shifts the
        # injections of the sequences that stay noisy.
        clean = bool(rng.random() < self.config.clean_frac) or not self.kinds
        if clean:
            return Injection(response, [], True, False, len(word_spans(response)[0]), 0, list(keep))
        slots = _Slots(response, [(sp.start, sp.end) for sp in keep])
        n = len(slots)
        edits: list[_Edit] = []
        rate = self.config.effective_rate
        if rate is not None:
            if rate > 0 and n:
                # Vectorised draws: per-call numpy overhead would dominate a long response.
                selected = np.flatnonzero(rng.random(n) < rate).tolist()
                draws = rng.random((len(selected), N_UNIFORMS)).tolist()
                for k, u in zip(selected, draws):
                    kind = self._choose(slots, k, u[0])
                    if kind is not None:
                        edits.append(self._families[kind].make(slots, k, u, self.resources))
        else:
            edits = self._target_edits(slots, rng, float(self.config.target_frac))
        if not edits:
            return Injection(response, [], False, self._any_eligible(slots), n, 0, list(keep))
        edits.sort(key=lambda ed: ed.start)
        text, spans = apply_edits(response, edits)
        return Injection(
            text, spans, False, True,
            n + sum(ed.words_added for ed in edits), sum(ed.noise_words for ed in edits), shift_spans(keep, edits),
        )

    def _target_edits(self, slots: _Slots, rng: np.random.Generator, target: float) -> list[_Edit]:
        """Greedy: add events over a random slot order while that brings the noise share closer to target."""
        total = len(slots)
        if target <= 0 or total == 0:
            return []
        noise = 0
        edits: list[_Edit] = []
        order = rng.permutation(total).tolist()
        for b in range(0, total, _TARGET_BLOCK):
            block = order[b:b + _TARGET_BLOCK]
            draws = rng.random((len(block), N_UNIFORMS)).tolist()
            for k, u in zip(block, draws):
                if noise / total >= target:
                    return edits
                kind = self._choose(slots, k, u[0])
                if kind is None:
                    continue
                ed = self._families[kind].make(slots, k, u, self.resources)
                new_noise, new_total = noise + ed.noise_words, total + ed.words_added
                if abs(new_noise / new_total - target) > abs(noise / total - target):
                    return edits
                noise, total = new_noise, new_total
                edits.append(ed)
        return edits

