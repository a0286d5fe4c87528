"""Document quality filters in the spirit of Gopher / FineWeb-2: cheap statistics over words, lines
and paragraphs, each compared with a threshold that a data.toml can set globally or per language.

`check(text, lang, config) -> reason | None`: the first failing rule names the rejection, so every
rejected document carries exactly one reason. Thresholds follow Gopher (Rae et al. 2021, App. A)
and FineWeb-2's per-language adaptation, loosened where the EU corpora need it (Finnish and
Hungarian have long words; Common Voice / Tatoeba blocks are lists of short sentences).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from levante.config import ConfigError, from_dict

# A few of the most frequent function words per EU language: real prose contains some of them,
# keyword lists, tables and boilerplate usually do not (Gopher's stop-word rule, per language).
STOP_WORDS: dict[str, frozenset[str]] = {k: frozenset(v.split()) for k, v in {
    "bg": "и в на за да се не от е с че са по това как ще той тя те ние но",
    "cs": "a v se na je že to s z o do i k by ale jsem jako pro které který není",
    "da": "og i at det er en til på de den med for af ikke som har jeg var han der",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es",
    "el": "και το η να του της την με σε τα που από είναι για δεν ο οι θα στο",
    "en": "the be to of and a in that have it is was for on with as at by this not",
    "es": "de la que el en y a los se del las un por con no una su para es al lo",
    "et": "ja on ei et see ta oli kui ka mis aga siis nii kes oma seda ning",
    "fi": "ja on ei se että oli hän mutta kun ovat tai niin kuin jo myös ole",
    "fr": "de la le et les des en un une du est que pas pour qui dans il ne sur au",
    "ga": "an na agus ar a i is sé go le do ag níl bhí sí ní mé tá",
    "hr": "i u je se na da su za od a ne s što to kao ali bi o iz sam",
    "hu": "a az és hogy nem is egy de van meg el ez már csak mint volt ki",
    "it": "di e il la che in a per un è non una del con le si da i lo sono",
    "lt": "ir kad yra o į su bet tai jis ji nuo iš per ar buvo kaip",
    "lv": "un ir ka uz ar par no bet kas tas ar to bija viņš arī lai",
    "mt": "il u ta li fil tal biex huwa hija għal mill minn fuq dan din kien",
    "nl": "de en van het een in is dat op te niet met zijn voor die er aan ik",
    "pl": "i w się na z nie do to że jest o jak a ale po co tak za od",
    "pt": "de a o que e do da em um para com não uma os no se na por mais as",
    "ro": "și de în la a cu nu că se pe o un din mai este care sunt ca",
    "sk": "a v sa na je že to s z o do aj k by ale som ako pre ktoré nie",
    "sl": "in je v na se da za so z ki s pa ne to bi kot tudi iz sem",
    "sv": "och i att det som en på är av för med till den har inte jag de var om",
}.items()}
BULLETS = ("•", "●", "○", "▪", "◦", "‣", "⁃", "-", "*", "–", "·")
ELLIPSES = ("...", "…")
TERMINAL = (".", "!", "?", '"', "”", "»", "…", ":", ";", ")", "'")


@dataclass
class FilterRules:
    """One language's thresholds. 0 (or an empty list) switches a rule off."""

    min_chars: int = 20
    max_chars: int = 1_000_000  # longer documents are rejected before any statistic is computed
    min_words: int = 3
    min_mean_word_len: float = 2.0
    max_mean_word_len: float = 14.0
    max_symbol_ratio: float = 0.1  # "#" and ellipses per word (Gopher)
    max_non_alpha_words: float = 0.5  # fraction of words without a letter (Gopher keeps >= 80% alphabetic)
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of lines ending with an ellipsis
    max_line_chars: int = 100_000
    max_dup_lines: float = 0.3  # fraction of lines that repeat an earlier line
    max_dup_line_chars: float = 0.2  # fraction of characters in repeated lines
    max_dup_paragraphs: float = 0.3
    max_dup_paragraph_chars: float = 0.2
    # Gopher: the most frequent 2/3/4-gram may cover at most this fraction of word characters
    max_top_ngram: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    # Gopher: characters inside repeated 5..10-grams, at most this fraction
    max_dup_ngram: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    min_stop_words: int = 1  # distinct stop words of the document's language (0: off)


@dataclass
class FilterConfig:
    enabled: bool = True
    default: FilterRules = field(default_factory=FilterRules)
    lang: dict[str, dict] = field(default_factory=dict)  # per-language overrides of FilterRules keys

    def rules_for(self, lang: str) -> FilterRules:
        over = self.lang.get(lang)
        if not over:
            return self.default
        merged = {**dataclasses.asdict(self.default), **over}
        return from_dict(FilterRules, merged, f"filters.lang.{lang}")

    def validate(self) -> FilterConfig:
        for lang in self.lang:
            self.rules_for(lang)
        for rules in (self.default,):
            if rules.min_chars > rules.max_chars:
                raise ConfigError("filters: min_chars is above max_chars")
        return self


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in them)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            dup += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup / len(items), dup_chars / max(total_chars, 1)


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / total_chars


def _dup_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters of the words covered by any n-gram that occurs more than once (each word once)."""
    if len(words) < n:
        return 0.0
    seen: set[tuple] = set()
    covered = bytearray(len(words))
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            covered[i:i + n] = b"\x01" * n
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total_chars


def check_length(text: str, config: FilterConfig) -> str | None:
    """The language-independent length rules of the default table, for use before language ID."""
    if not config.enabled:
        return None
    r = config.default
    if len(text) < min([r.min_chars, *(o.get("min_chars", r.min_chars) for o in config.lang.values())]):
        return "too short"
    if r.max_chars and len(text) > max([r.max_chars, *(o.get("max_chars", r.max_chars) for o in config.lang.values())]):
        return "too long"
    return None


def check(text: str, lang: str, config: FilterConfig) -> str | None:
    """The reason `text` fails the quality rules for `lang`, or None when it passes."""
    if not config.enabled:
        return None
    r = config.rules_for(lang)
    if len(text) < r.min_chars:
        return "too short"
    if r.max_chars and len(text) > r.max_chars:
        return "too long"
    words = text.split()
    if len(words) < r.min_words:
        return "too few words"
    word_chars = sum(map(len, words))
    mean = word_chars / len(words)
    if mean < r.min_mean_word_len or (r.max_mean_word_len and mean > r.max_mean_word_len):
        return "mean word length"
    symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
    if r.max_symbol_ratio and symbols / len(words) > r.max_symbol_ratio:
        return "symbol ratio"
    if r.max_non_alpha_words and sum(not any(c.isalpha() for c in w) for w in words) / len(words) \
            > r.max_non_alpha_words:
        return "non-alphabetic words"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if r.max_line_chars and max(map(len, lines)) > r.max_line_chars:
        return "line too long"
    if r.max_bullet_lines and sum(line.startswith(BULLETS) for line in lines) / len(lines) > r.max_bullet_lines:
        return "bullet lines"
    if r.max_ellipsis_lines and sum(line.endswith(ELLIPSES) for line in lines) / len(lines) \
            > r.max_ellipsis_lines:
        return "ellipsis lines"
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    dup, dup_chars = _dup_fraction(paragraphs)
    if (r.max_dup_paragraphs and dup > r.max_dup_paragraphs) or \
            (r.max_dup_paragraph_chars and dup_chars > r.max_dup_paragraph_chars):
        return "repeated paragraphs"
    dup, dup_chars = _dup_fraction(lines)
    if (r.max_dup_lines and dup > r.max_dup_lines) or (r.max_dup_line_chars and dup_chars > r.max_dup_line_chars):
        return "repeated lines"
    lowered = [w.lower() for w in words]
    for n, limit in enumerate(r.max_top_ngram, start=2):
        if limit and _top_ngram_fraction(lowered, n, word_chars) > limit:
            return f"repeated {n}-gram"
    for n, limit in enumerate(r.max_dup_ngram, start=5):
        if limit and _dup_ngram_fraction(lowered, n, word_chars) > limit:
            return f"repeated {n}-grams"
    stops = STOP_WORDS.get(lang)
    if r.min_stop_words and stops is not None:
        found = {w.strip(".,;:!?\"'()«»„“”") for w in lowered} & stops
        if len(found) < r.min_stop_words:
            return "no stop words"
    return None
