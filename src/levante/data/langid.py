"""Offline language identification: py3langid's naive Bayes model (ships inside the wheel, ~140
labels), open to every language it knows so that non-EU text is rejected instead of being forced
into the nearest EU label, plus a second opinion for the pairs it confuses.

py3langid alone, open to all its labels, calls ~25% of Croatian FLORES sentences Bosnian or
Serbian and ~1-2% of Danish Norwegian (BENCHMARKS.md). Those languages share most of their
vocabulary, so the detector's probabilities are split across the group rather than wrong about
the group. The decision is therefore made in two steps:

1. the detector picks a *group* (the EU language plus the neighbours it is confused with); the
   group's probability mass is the score;
2. inside the group, script letters and function words that only one member uses (Serbian
   ekavian forms, Danish `af/ud/mig`, Russian `ы/э/ё`, Slovak `ä/ľ/ô`, ...) pick the member. With
   no evidence either way the EU member wins: a sentence without a single Bosnian or Norwegian
   marker is valid standard Croatian or Danish.

A label outside `allowed`, or a score below the language's threshold, is a rejection, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

EU_LANGUAGES = ("bg", "cs", "da", "de", "el", "en", "es", "et", "fi", "fr", "ga", "hr", "hu", "it", "lt", "lv",
                "mt", "nl", "pl", "pt", "ro", "sk", "sl", "sv")

# EU language -> the labels py3langid confuses it with (measured on FLORES + the shared corpus).
GROUPS: dict[str, tuple[str, ...]] = {
    "hr": ("hr", "bs", "sr"),
    "da": ("da", "no", "nn"),
    "bg": ("bg", "ru", "mk", "uk", "sr"),
    "cs": ("cs", "sk"),
    "sk": ("sk", "cs"),
    "pt": ("pt", "gl"),
    "es": ("es", "gl", "ext", "an", "ca"),
    "it": ("it", "vec", "lij"),
    "nl": ("nl", "af", "fy"),
}


def _words(*words: str) -> re.Pattern:
    return re.compile(r"(?<!\w)(?:" + "|".join(words) + r")(?!\w)", re.IGNORECASE)


def _stems(*stems: str) -> re.Pattern:
    return re.compile(r"(?<!\w)(?:" + "|".join(stems) + r")\w*", re.IGNORECASE)


def _letters(chars: str) -> re.Pattern:
    return re.compile(f"[{chars}]", re.IGNORECASE)


# Evidence that only one member of a group uses. Each hit counts once; the member with most hits wins.
MARKERS: dict[str, list[re.Pattern]] = {
    # Croatian: its own lexicon (month names, tko, tisuća, kruh, tijekom, ...) and infinitives after modals
    "hr": [_words("tko", "nitko", "netko", "što", "kruh", "vlak", "tjedan", "tjedna", "tjednu",
                  "tijekom", "uvjet", "uvjeti", "uvjeta", "tisuću", "tisuća", "tisuće", "opći",
                  "opća", "opće", "točno", "glazba", "glazbe", "kazalište", "zrakoplov", "nogomet",
                  "znanost", "povijest", "povijesti", "obitelj", "obitelji", "kemija", "sveučilište",
                  "siječnja", "veljače", "ožujka", "travnja", "svibnja", "lipnja", "srpnja", "kolovoza",
                  "rujna", "listopada", "studenoga", "studenog", "prosinca", "lipanj", "srpanj")],
    # Serbian (Latin, ekavian) and Bosnian lexicon
    "sr": [_words("ko", "niko", "neko", "šta", "hleb", "voz", "nedelja", "nedelje", "tokom", "uslov",
                  "uslovi", "uslova", "hiljadu", "hiljada", "hiljade", "opšti", "opšte", "tačno", "muzika",
                  "muzike", "pozorište", "fudbal", "nauka", "nauke", "istorija", "istorije", "porodica",
                  "porodice", "hemija", "univerzitet", "reka", "mleko", "lepo", "lep", "vreme",
                  "deca", "dete", "devojka", "mesto", "mesta", "pesma", "vek", "veka", "reč", "reči",
                  "gde", "ovde", "uvek", "januara", "februara", "marta", "aprila",
                  "juna", "jula", "avgusta", "septembra", "oktobra", "novembra", "decembra"),
           # ekavian stems where Croatian writes ije/je (pjesma, djevojka, mlijeko, pjevati, cijel-)
           _stems("pesm", "devojk", "mlek", "pev", "cel[oaiu](?!\\w)", "celog", "celokup", "dec[aueio](?!\\w)",
                  "decom", "detet", "rek[aeu](?!\\w)", "rekom", "vozom", "vozu", "lep[aeiou](?!\\w)", "lepot",
                  "vreme(?!\\w)", "nedelj", "hiljad", "uslov", "opšt", "istorij", "porodic"),
           _letters("ђћџљњј")],
    "bs": [_words("šta", "historija", "historije", "hiljadu", "hiljada", "lahko", "mehko", "kahva", "kafa",
                  "sahat", "hljeb", "sedmica", "sedmice", "univerzitet", "juni", "juli", "januar", "februar")],
    # Danish vs Norwegian (Bokmål, Nynorsk): spellings that split after 1907 / 1938
    "da": [_words("af", "ud", "mig", "dig", "sig", "hvad", "noget", "meget", "efter", "blev", "nu", "gøre",
                  "gør", "uge", "siger", "sagde", "jer", "hvorfor", "nogen", "købe", "lidt", "vej"),
           _stems("\\w+hed(?:en|er)?(?!\\w)")],
    "no": [_words("av", "ut", "meg", "deg", "seg", "hva", "noe", "mye", "etter", "ble", "nå", "gjøre",
                  "gjør", "uke", "sier", "sa", "dere", "hvorfor", "noen", "kjøpe", "litt", "vei", "ikkje",
                  "eg", "kva", "berre", "kjem", "ein", "eit"),
           _stems("kj")],
    "nn": [_words("ikkje", "eg", "kva", "berre", "kjem", "ein", "eit", "dei", "korleis", "kvifor")],
    # Cyrillic: letters each alphabet has and the others lack, and Russian/Bulgarian function words
    "bg": [_words("че", "ще", "са", "това", "тези", "които", "който", "която", "което", "какво", "беше",
                  "съм", "със", "във", "към", "но", "ли", "обаче", "защото", "където")],
    "ru": [_letters("ыэё"), _words("что", "это", "был", "была", "было", "были", "мне", "меня", "его",
                                    "она", "они", "нет", "вы", "уже", "очень", "когда", "только", "если",
                                    "который", "которые", "чтобы", "тоже", "сейчас")],
    "uk": [_letters("іїєґ")],
    "mk": [_letters("ѓќѕ")],
    # Czech / Slovak letters and words
    "cs": [_letters("ěřů"), _words("jsem", "jsou", "není", "také", "jako", "který", "která", "které",
                                    "proto", "když", "mezi", "nebo", "se")],
    "sk": [_letters("äľĺŕô"), _words("som", "sú", "nie", "tiež", "ako", "ktorý", "ktorá", "ktoré",
                                      "preto", "keď", "medzi", "alebo", "sa", "aj")],
    "gl": [_words("non", "unha", "unhas", "xa", "moi", "tamén", "coa", "co", "pola", "máis", "hai", "dun", "dunha",
                  "nun", "nunha", "cando", "teñen")],
}


def evidence(text: str, lang: str) -> int:
    """How many distinct markers of `lang` occur in `text`."""
    hits = 0
    for pattern in MARKERS.get(lang, ()):
        hits += len({m.group(0).lower() for m in pattern.finditer(text)})
    return hits


@dataclass(frozen=True)
class LangResult:
    lang: str  # ISO 639-1 (py3langid label) of the decision; "und" when nothing was detected
    score: float  # probability mass of the decided group (0..1)
    detector: str  # py3langid's own top label, for the record


@dataclass
class LangIdConfig:
    allowed: tuple[str, ...] = EU_LANGUAGES
    min_score: float = 0.4  # default threshold on the group's probability mass
    min_score_per_lang: dict[str, float] = field(default_factory=dict)
    combine: bool = True  # False: py3langid's label as is (the baseline in benchmarks/bench_langid.py)

    def threshold(self, lang: str) -> float:
        return self.min_score_per_lang.get(lang, self.min_score)


class LanguageIdentifier:
    """`identify(text) -> LangResult`; `accept(result) -> reason or None`."""

    def __init__(self, config: LangIdConfig | None = None, restrict: tuple[str, ...] | None = None):
        self.config = config or LangIdConfig()
        self._restrict = restrict  # only for the benchmark's "closed set" baseline

    @cached_property
    def _model(self):
        from py3langid.langid import MODEL_FILE
        from py3langid.langid import LanguageIdentifier as Model

        model = Model.from_model_file(MODEL_FILE, norm_probs=True)
        if self._restrict:
            model.set_languages(list(self._restrict))
        return model

    @property
    def labels(self) -> list[str]:
        return self._model.labels

    def identify(self, text: str) -> LangResult:
        sample = text[:4000]  # a few kB decide the language; a 10 MB document must not cost seconds
        ranked = dict(self._model.rank(sample))
        top = max(ranked, key=ranked.get)
        if not self.config.combine:
            return LangResult(top, ranked[top], top)
        # the group of the top label: its own when it is an allowed EU language, else the first
        # allowed EU language it is confused with
        home = top if top in GROUPS and top in self.config.allowed else next(
            (eu for eu, members in GROUPS.items() if top in members and eu in self.config.allowed), None)
        if home is None:
            return LangResult(top, ranked[top], top)
        members = GROUPS[home]
        mass = sum(ranked.get(m, 0.0) for m in members)
        hits = {m: evidence(sample, m) for m in members}
        if home == "hr":  # Bosnian and Serbian share most markers: pool them against Croatian
            hits["sr"] = hits["bs"] = max(hits["sr"], hits["bs"])
        if home in ("cs", "sk"):  # two EU languages: evidence decides, the detector breaks ties
            best = max(members, key=lambda m: (hits[m], ranked.get(m, 0.0)))
            return LangResult(best, mass, top)
        best_other = max((m for m in members if m != home), key=lambda m: (hits[m], ranked.get(m, 0.0)))
        if hits[best_other] > hits[home]:
            return LangResult(best_other, mass, top)
        return LangResult(home, mass, top)

    def reject_reason(self, result: LangResult) -> str | None:
        """None when the result may be kept; else the rejection reason."""
        if result.lang not in self.config.allowed:
            return "language not allowed"
        if result.score < self.config.threshold(result.lang):
            return "language score below threshold"
        return None
