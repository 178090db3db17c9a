"""The canonical form of a text: what the model reads, so that disguised text scores like its plain form.

A classifier that reads raw text can be walked around with characters a person does not see or reads
past: fullwidth letters, a right-to-left override that displays reversed text the right way round,
leetspeak. `canonical_text` undoes these, in this order, and nothing else:

1. Bidi overrides. Text after RIGHT-TO-LEFT OVERRIDE (U+202E, until POP DIRECTIONAL FORMATTING or the end
   of the line) is displayed reversed; it is put into the order a reader sees (the reordering rule of the
   Unicode bidi algorithm, applied to the levels the overrides set; embeddings and isolates only nest).
   Right-to-left scripts without an override keep their logical order, which is already reading order.
2. Invisible characters are removed: format characters (Unicode category Cf: zero-width space and
   joiners, soft hyphen, bidi controls, byte-order mark, tag characters), control characters other than
   whitespace, surrogates, variation selectors, the combining grapheme joiner and the Hangul fillers and
   blank Braille cell used as "empty" letters. A text that is empty after this is empty.
3. NFKC: fullwidth and other compatibility forms become their plain letters and digits (fullwidth "kill" -> "kill",
   mathematical bold letters, ligatures, superscripts).
4. Look-alike letters: in a word that mixes Latin letters with Cyrillic or Greek ones ("kill" written
   with a Cyrillic i), the Cyrillic and Greek letters that look like Latin ones become those Latin letters. Words
   written wholly in Cyrillic or Greek are left alone: they are real words of those languages.
5. Leetspeak: in a run of ASCII letters, digits and @ $ ! | that mixes letters with 0 1 3 4 5 7 @ $ ! |,
   those characters become o i e a s t a s i l ("11" becomes "ll"), but only when one of them stands between
   two letters ("k1ll", "mys3lf", "d!e", "h0p3") or a "$" starts a lower-case word ("$uicide"). Left as they
   are, because ordinary text writes them: runs with another digit (2 6 8 9: "B2B", "COVID-19"), runs that
   start with a digit (numbers with units: "401k", "4G", "3rd", "10mg"; unless one digit starts a word that
   is leetspeak inside too, "1nsul1n", or a "0" one, "0verdose"), money and tickers ("$500", "$TSLA"),
   mentions ("@name"), digits only at the end (versions and names: "mp3", "ELI5", "F37"), codes in capitals
   ("A1C", "H1B", "HbA1c"), e-mail addresses and URLs, and a trailing "!" (punctuation). A run of three
   characters with a digit ("a1c", "t1d", "h1b") is decoded only into one of a few short words that matter
   here ("d1e" -> "die").

The pool, the review page and the logs keep the text as it was sent; only the model reads the canonical
form (the review page shows both when they differ). `text_problem` names text that cannot be processed at
all (a lone surrogate from a JSON escape such as "\\ud800" cannot be encoded as UTF-8): the service refuses
it with a 422 instead of failing inside the tokenizer.

Pure functions on `str`, standard library only: this runs on every classified text.
"""

from __future__ import annotations

import re
import unicodedata

# ----------------------------------------------------------------------------- 1. bidi overrides
_LRE, _RLE, _PDF, _LRO, _RLO = "\u202a", "\u202b", "\u202c", "\u202d", "\u202e"
_LRI, _RLI, _FSI, _PDI = "\u2066", "\u2067", "\u2068", "\u2069"
_OPENERS = {_LRE: "L", _RLE: "R", _LRO: "L", _RLO: "R", _LRI: "L", _RLI: "R", _FSI: "L"}
_ISOLATES = {_LRI, _RLI, _FSI}
_MAX_DEPTH = 125  # the bidi algorithm's limit on nesting


def _next_level(level: int, direction: str) -> int:
    """The least odd (right-to-left) or even (left-to-right) level above `level`."""
    if direction == "R":
        return level + 1 if level % 2 == 0 else level + 2
    return level + 2 if level % 2 == 0 else level + 1


def _reorder_line(line: str) -> str:
    """One line in display order as far as overrides change it (rule L2 of the bidi algorithm)."""
    stack: list[tuple[int, str | None, bool]] = [(0, None, False)]  # level, override, is_isolate
    chars: list[str] = []
    levels: list[int] = []
    for ch in line:
        if ch in _OPENERS:
            level, _, _ = stack[-1]
            new_level = _next_level(level, _OPENERS[ch])
            if new_level <= _MAX_DEPTH:
                override = _OPENERS[ch] if ch in (_LRO, _RLO) else None
                stack.append((new_level, override, ch in _ISOLATES))
            continue
        if ch == _PDF:
            if len(stack) > 1 and not stack[-1][2]:
                stack.pop()
            continue
        if ch == _PDI:
            while len(stack) > 1:
                if stack.pop()[2]:
                    break
            continue
        level, override, _ = stack[-1]
        if override != "R" and level % 2 == 1:
            level += 1  # not overridden: shown in its own order (reading order is logical order here)
        chars.append(ch)
        levels.append(level)
    for target in range(max(levels, default=0), 0, -1):
        i = 0
        while i < len(chars):
            if levels[i] < target:
                i += 1
                continue
            j = i
            while j < len(chars) and levels[j] >= target:
                j += 1
            chars[i:j] = chars[i:j][::-1]
            levels[i:j] = levels[i:j][::-1]
            i = j
    return "".join(chars)


def _reorder_overrides(text: str) -> str:
    if _RLO not in text and _LRO not in text:
        return text
    lines = text.splitlines(keepends=True)
    out = []
    for line in lines:
        body = line.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
        out.append(_reorder_line(body) + line[len(body) :])
    return "".join(out)


# ----------------------------------------------------------------------------- 2. invisible characters
_INVISIBLE_EXTRA = frozenset(
    "\u034f"  # combining grapheme joiner
    "\u115f\u1160\u3164\uffa0"  # Hangul fillers
    "\u2800"  # Braille pattern blank
    + "".join(chr(c) for c in range(0xFE00, 0xFE10))  # variation selectors
    + "".join(chr(c) for c in range(0xE0100, 0xE01F0))  # variation selectors supplement
)


def _is_invisible(ch: str) -> bool:
    if ch in _INVISIBLE_EXTRA:
        return True
    category = unicodedata.category(ch)
    return category in ("Cf", "Cs") or (category == "Cc" and not ch.isspace())


def _drop_invisible(text: str) -> str:
    if text.isascii():
        return text if text.isprintable() else "".join(ch for ch in text if ch.isprintable() or ch.isspace())
    return "".join(ch for ch in text if not _is_invisible(ch))


# ----------------------------------------------------------------------------- 4. look-alike letters
# Cyrillic and Greek letters drawn like a Latin letter in common fonts (a subset of Unicode's confusables,
# letters only: a small table is cheaper per request than a confusables library, and easier to review).
_LOOKALIKES = str.maketrans(
    {
        **dict(zip("асеіјкорѕхуԁһԛԝӏ", "aceijkopsxydhqwl", strict=True)),
        **dict(zip("АВЕІЈКМНОРЅСТХУҮԚԜҺ", "ABEIJKMHOPSCTXYYQWH", strict=True)),
        **dict(zip("αικνορυχ", "aikvopux", strict=True)),
        **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "ABEZHIKMNOPTYX", strict=True)),  # noqa: RUF001
    }
)


def _script(ch: str) -> str | None:
    code = ord(ch)
    if ch.isascii() or 0x00C0 <= code <= 0x024F or 0x1E00 <= code <= 0x1EFF:
        return "latin"
    if 0x0400 <= code <= 0x052F:
        return "cyrillic"
    if 0x0370 <= code <= 0x03FF:
        return "greek"
    return None


def _unconfuse_word(word: str) -> str:
    scripts = {_script(ch) for ch in word if ch.isalpha()}
    if "latin" in scripts and ("cyrillic" in scripts or "greek" in scripts):
        return word.translate(_LOOKALIKES)
    return word


def _unconfuse(text: str) -> str:
    if text.isascii():
        return text
    return re.sub(r"\S+", lambda m: _unconfuse_word(m.group()), text)


# ----------------------------------------------------------------------------- 5. leetspeak
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i", "|": "l"}
_LEET_CHARS = frozenset(_LEET)
_OTHER_DIGITS = frozenset("2689")
_RUN = re.compile(r"[A-Za-z0-9@$!|]+")
_SKIP_TOKEN = re.compile(r"://|^www\.|@[^@\s]*\.[A-Za-z]")  # URLs and e-mail addresses
# Words a run of three characters with a digit may decode into: such runs are otherwise codes ("a1c", "t1d").
_SHORT_WORD_LIST = (
    "die died dies dead cut cuts end gun shot hang rope jump pill pills dose od kms kys life hope harm hurt pain "
    "bleed bled burn self help sue not now"
)
_SHORT_WORDS = frozenset(_SHORT_WORD_LIST.split())
_LEADING_ZERO_WORD = re.compile(r"0[ac-npq-wyz][a-z]{2}")  # "0verdose"; not "0x1f", "0b101"
_LEET_HINT = re.compile(r"[A-Za-z][0-9@$!|]|\$[a-z]|\b0[a-z]")


def _decode(core: str) -> str:
    out = re.sub(r"1{2,}", lambda m: "l" * len(m.group()), core)
    decoded = "".join(_LEET.get(ch, ch) for ch in out)
    letters = [ch for ch in core if ch.isalpha()]
    return decoded.upper() if letters and all(ch.isupper() for ch in letters) else decoded


def _deleet_run(run: str) -> str:
    core = run.rstrip("!")  # a trailing "!" is punctuation
    tail = run[len(core) :]
    if not core or core[0] == "@" or _OTHER_DIGITS.intersection(core):
        return run
    letters = [i for i, ch in enumerate(core) if ch.isalpha()]
    leet = [i for i, ch in enumerate(core) if ch in _LEET_CHARS]
    if not letters or not leet:
        return run
    interior = any(letters[0] < i < letters[-1] for i in leet)
    if core[0].isdigit():
        if not (_LEADING_ZERO_WORD.match(core) or (core[1].isalpha() and interior)):
            return run  # a number with a unit: "401k", "4G", "3rd"; but "0verdose", "1nsul1n" are words
    elif core[0] == "$":
        rest = core[1:]
        if not rest or not rest[0].isalpha() or not rest[0].islower():
            return run  # money ("$5k") or a ticker ("$TSLA")
    elif not interior:
        return run  # nothing between two letters: "mp3", "ELI5", "help!"
    has_digit = any(core[i].isdigit() for i in leet)
    uppers = sum(core[i].isupper() for i in letters)
    inner_capital = 0 < uppers < len(letters) and any(ch.isupper() for ch in core[1:])
    if has_digit and (inner_capital or uppers == len(letters) <= 2):
        return run  # a code in capitals: "A1C", "H1B", "HbA1c" (but "K1LL" is shouted leetspeak)
    decoded = _decode(core)
    if has_digit and len(core) <= 3 and decoded.lower() not in _SHORT_WORDS:
        return run  # "a1c", "t1d", "h1b": too short to tell from a code
    return decoded + tail


def _deleet_token(token: str) -> str:
    if _SKIP_TOKEN.search(token):
        return token
    return _RUN.sub(lambda m: _deleet_run(m.group()), token)


def _deleet(text: str) -> str:
    if not _LEET_HINT.search(text):
        return text
    return re.sub(r"\S+", lambda m: _deleet_token(m.group()), text)


# ----------------------------------------------------------------------------- the public functions
def canonical_text(text: str) -> str:
    """What the model reads for `text` (see the module docstring); never raises, and is idempotent."""
    text = _drop_invisible(_reorder_overrides(text))
    text = unicodedata.normalize("NFKC", text)
    text = _deleet(_unconfuse(text))
    if not text.isascii():
        text = _drop_invisible(unicodedata.normalize("NFKC", text))
    return text


def is_blank(text: str) -> bool:
    """True when nothing readable is left: only whitespace and invisible characters."""
    return not canonical_text(text).strip()


def text_problem(text: str) -> str | None:
    """Why `text` cannot be classified at all (it cannot be encoded as UTF-8), or None when it can.

    The only such strings are those with a surrogate code point: a JSON escape like "\\ud800" that is not
    part of a high-low pair decodes to one, and the tokenizer (and PostgreSQL) refuse it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        return (
            f"has a lone surrogate \\u{code:04x} at position {exc.start}, which is not a character; "
            "send valid UTF-8 (in JSON, a \\ud800-\\udbff escape must be followed by a \\udc00-\\udfff one)"
        )
    return None
