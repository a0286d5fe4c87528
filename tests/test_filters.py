"""Quality filters: each rule rejects a document built to break it (with its reason) and keeps
ordinary prose; thresholds are per language."""

from __future__ import annotations

import pytest

from levante.config import ConfigError
from levante.data.filters import STOP_WORDS, FilterConfig, FilterRules, check

GOOD_EN = ("The river runs through the old town and the bridge is crowded in the morning.\n"
           "Most people walk to work, and some of them stop for coffee on the way.\n\n"
           "In the evening the market opens near the station, where farmers sell fruit.")
GOOD_DE = "Der Fluss fließt durch die Altstadt, und die Brücke ist am Morgen voller Menschen, die zur Arbeit gehen."


def test_ordinary_prose_passes():
    cfg = FilterConfig()
    assert check(GOOD_EN, "en", cfg) is None
    assert check(GOOD_DE, "de", cfg) is None


def test_stop_word_lists_cover_the_eu_languages():
    assert len(STOP_WORDS) == 24 and all(len(v) >= 15 for v in STOP_WORDS.values())


BAD = [
    ("too short", "Hi there"),
    ("too few words", "Supercalifragilisticexpialidocious antidisestablishment"),
    ("mean word length", "a b c d e f g h i j k l m n o p q r s t u v w x y z"),
    ("mean word length", " ".join(["Donaudampfschifffahrtsgesellschaftskapitän"] * 3) + " the"),
    ("symbol ratio", "#tag #news #today the #best #deal of #the #week #ever"),
    ("non-alphabetic words", "the 12 34 56 78 90 11 22 33 44 and"),
    ("bullet lines", "- the apples\n- the pears\n- the plums\n- the cherries"),
    ("ellipsis lines", "the first line of the story goes on for a while and then...\n"
     "the second line of the story goes on for a while longer...\nand the third one is a fine line of text"),
    ("repeated lines", "the same line of text here\n" * 5 + "and one different line of text"),
    ("repeated paragraphs", "A paragraph of the text, first\n\nthe second one here with words\n\n"
     "the second one here with words\n\nthe second one here with words"),
    ("repeated 2-gram", "the cat " * 6 + "sat on a mat today with a dog and a bird"),
    ("no stop words", "Quarterly revenue projections exceeded analyst consensus estimates substantially."),
]


@pytest.mark.parametrize("reason,text", BAD)
def test_each_rule_rejects_with_its_reason(reason, text):
    assert check(text, "en", FilterConfig()) == reason


def test_repeated_long_ngrams():
    text = ("one two three four five of the six seven eight nine ten one two three four five "
            "eleven twelve thirteen fourteen fifteen")
    no_top = FilterConfig(default=FilterRules(max_top_ngram=[0, 0, 0]))
    assert check(text, "en", no_top) == "repeated 5-grams"
    assert check(text, "en", FilterConfig(default=FilterRules(max_top_ngram=[0, 0, 0], max_dup_ngram=[]))) is None


def test_rules_switch_off_and_documents_then_pass():
    text = BAD[-1][1]
    assert check(text, "en", FilterConfig(default=FilterRules(min_stop_words=0))) is None
    assert check(text, "en", FilterConfig(enabled=False)) is None


def test_per_language_overrides():
    long_words = "kaksikymmentäviisivuotias opiskelijatoveri isoisänsä talossa"
    strict = FilterConfig(default=FilterRules(max_mean_word_len=10.0, min_stop_words=0))
    assert check(long_words, "fi", strict) == "mean word length"
    fi_loose = FilterConfig(default=FilterRules(max_mean_word_len=10.0, min_stop_words=0),
                            lang={"fi": {"max_mean_word_len": 20.0}})
    assert check(long_words, "fi", fi_loose) is None
    assert check(long_words, "et", fi_loose) == "mean word length"  # only Finnish was loosened


def test_unknown_override_key_is_a_config_error():
    with pytest.raises(ConfigError, match="max_mean_wordlen"):
        FilterConfig(lang={"fi": {"max_mean_wordlen": 20}}).validate()


def test_too_long_document_rejected_before_statistics():
    assert check("word " * 300_000, "en", FilterConfig()) == "too long"
