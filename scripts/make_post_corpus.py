"""Write the bundled post-training set, src/levante/post_corpus/ (CC0, the project's own text).

    python scripts/make_post_corpus.py

Deterministic (fixed seed). Per language (8 EU languages), conversations a tiny model can learn:
greetings answered in kind, counting / repeating / reversing words, and completing a sentence of
the bundled sample corpus (src/levante/sample_corpus/, also the project's own CC0 text). Preference
pairs put a good answer against a wrong-language, truncated or off-topic one.
Files: chat.{train,valid}.jsonl ({"lang", "task", "messages"}), prefs.{train,valid}.jsonl
({"lang", "task", "kind", "prompt", "chosen", "rejected"}).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "levante"
OUT = ROOT / "post_corpus"
CONVS_PER_TASK = {"train": 24, "valid": 3}
PAIRS_PER_LANG = {"train": 30, "valid": 8}

# Per language: greetings (user), the greeting answer, and prompt/answer templates, all written here.
LANGS = {
    "en": dict(hello=["Hello!", "Hi, how are you?", "Good morning!", "Good evening!"],
               reply="Hello! How can I help you today?",
               count="How many words are in this: {w}", counted="There are {n} words.",
               repeat="Repeat these words: {w}", reverse="Write these words in reverse order: {w}",
               complete="Complete the sentence: {a}"),
    "de": dict(hello=["Hallo!", "Hallo, wie geht es dir?", "Guten Morgen!", "Guten Abend!"],
               reply="Hallo! Wie kann ich dir heute helfen?",
               count="Wie viele Wörter hat das: {w}", counted="Das sind {n} Wörter.",
               repeat="Wiederhole diese Wörter: {w}", reverse="Schreibe diese Wörter in umgekehrter Reihenfolge: {w}",
               complete="Vervollständige den Satz: {a}"),
    "fr": dict(hello=["Bonjour !", "Salut, comment ça va ?", "Bonsoir !", "Bonjour, tu vas bien ?"],
               reply="Bonjour ! Comment puis-je vous aider aujourd'hui ?",
               count="Combien de mots y a-t-il ici : {w}", counted="Il y a {n} mots.",
               repeat="Répète ces mots : {w}", reverse="Écris ces mots dans l'ordre inverse : {w}",
               complete="Complète la phrase : {a}"),
    "es": dict(hello=["¡Hola!", "Hola, ¿qué tal?", "¡Buenos días!", "¡Buenas noches!"],
               reply="¡Hola! ¿En qué puedo ayudarte hoy?",
               count="¿Cuántas palabras hay aquí: {w}?", counted="Hay {n} palabras.",
               repeat="Repite estas palabras: {w}", reverse="Escribe estas palabras en orden inverso: {w}",
               complete="Completa la frase: {a}"),
    "it": dict(hello=["Ciao!", "Ciao, come stai?", "Buongiorno!", "Buonasera!"],
               reply="Ciao! Come posso aiutarti oggi?",
               count="Quante parole ci sono qui: {w}", counted="Ci sono {n} parole.",
               repeat="Ripeti queste parole: {w}", reverse="Scrivi queste parole in ordine inverso: {w}",
               complete="Completa la frase: {a}"),
    "nl": dict(hello=["Hallo!", "Hoi, hoe gaat het?", "Goedemorgen!", "Goedenavond!"],
               reply="Hallo! Hoe kan ik je vandaag helpen?",
               count="Hoeveel woorden staan hier: {w}", counted="Er zijn {n} woorden.",
               repeat="Herhaal deze woorden: {w}", reverse="Schrijf deze woorden in omgekeerde volgorde: {w}",
               complete="Maak de zin af: {a}"),
    "pt": dict(hello=["Olá!", "Olá, como estás?", "Bom dia!", "Boa noite!"],
               reply="Olá! Como posso ajudar hoje?",
               count="Quantas palavras há aqui: {w}", counted="Há {n} palavras.",
               repeat="Repete estas palavras: {w}", reverse="Escreve estas palavras por ordem inversa: {w}",
               complete="Completa a frase: {a}"),
    "pl": dict(hello=["Cześć!", "Cześć, jak się masz?", "Dzień dobry!", "Dobry wieczór!"],
               reply="Cześć! W czym mogę dziś pomóc?",
               count="Ile słów jest tutaj: {w}", counted="Liczba słów: {n}.",
               repeat="Powtórz te słowa: {w}", reverse="Napisz te słowa w odwrotnej kolejności: {w}",
               complete="Dokończ zdanie: {a}"),
}


def corpus(lang: str) -> tuple[list[str], list[str]]:
    """(plain lowercase words, sentences of 40-110 characters) of the bundled sample corpus."""
    texts = [json.loads(line)["text"] for line in
             (ROOT / "sample_corpus" / f"{lang}.train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    words = sorted({w for t in texts for w in re.findall(r"\b[^\W\d_]{3,9}\b", t) if w.islower()})
    sentences = sorted({s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", t)
                        if 40 <= len(s.strip()) <= 110 and "\n" not in s.strip()})
    return words, sentences


def chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def examples(lang: str, rng: random.Random, n: int, words: list[str], sentences: list[str]) -> list[dict]:
    """n conversations of each task in one language, as {"lang", "task", "user", "answer"}."""
    t = LANGS[lang]
    out = []
    for _ in range(n):
        ws = rng.sample(words, rng.randint(2, 5))
        w = " ".join(ws)
        sentence = rng.choice(sentences).split()
        cut = len(sentence) // 2
        out += [
            dict(task="greeting", user=rng.choice(t["hello"]), answer=t["reply"]),
            dict(task="count", user=t["count"].format(w=w), answer=t["counted"].format(n=len(ws))),
            dict(task="repeat", user=t["repeat"].format(w=w), answer=w),
            dict(task="reverse", user=t["reverse"].format(w=w), answer=" ".join(reversed(ws))),
            dict(task="complete", user=t["complete"].format(a=" ".join(sentence[:cut])),
                 answer=" ".join(sentence[cut:])),
        ]
    return [dict(lang=lang, **e) for e in out]


def bad_answer(e: dict, kind: str, rng: random.Random, other: dict) -> str:
    if kind == "wrong_language":  # the same kind of answer, but in another language
        return other["answer"]
    if kind == "truncated":
        words = e["answer"].split()
        return " ".join(words[: max(1, len(words) // 2)]) if len(words) > 1 else e["answer"][: len(e["answer"]) // 2]
    return other["answer_off_topic"]


def main() -> None:
    rng = random.Random(20261203)
    OUT.mkdir(parents=True, exist_ok=True)
    pools = {lang: corpus(lang) for lang in LANGS}
    for split in ("train", "valid"):
        by_lang = {lang: examples(lang, rng, CONVS_PER_TASK[split], *pools[lang]) for lang in LANGS}
        convs = [e for lang in LANGS for e in by_lang[lang]]
        with open(OUT / f"chat.{split}.jsonl", "w", encoding="utf-8") as f:
            for e in convs:
                f.write(json.dumps({"lang": e["lang"], "task": e["task"], "messages": chat(e["user"], e["answer"])},
                                   ensure_ascii=False) + "\n")
        with open(OUT / f"prefs.{split}.jsonl", "w", encoding="utf-8") as f:
            for lang in LANGS:
                pool = by_lang[lang]
                for i in range(PAIRS_PER_LANG[split]):
                    e = pool[rng.randrange(len(pool))]
                    kind = ("wrong_language", "truncated", "off_topic")[i % 3]
                    if kind == "truncated" and len(e["answer"]) < 4:
                        kind = "wrong_language"
                    other_lang = rng.choice([x for x in LANGS if x != lang])
                    same_task = [x for x in by_lang[other_lang] if x["task"] == e["task"]]
                    off = [x for x in pool if x["task"] != e["task"]]
                    other = dict(answer=rng.choice(same_task)["answer"], answer_off_topic=rng.choice(off)["answer"])
                    if e["task"] in ("count", "greeting"):  # same numbers, other language: a clean contrast
                        other["answer"] = (LANGS[other_lang]["reply"] if e["task"] == "greeting" else
                                           LANGS[other_lang]["counted"].format(n=len(e["user"].split(":")[-1].split())))
                    rejected = bad_answer(e, kind, rng, other)
                    if rejected == e["answer"]:
                        continue
                    f.write(json.dumps({"lang": lang, "task": e["task"], "kind": kind,
                                        "prompt": [{"role": "user", "content": e["user"]}],
                                        "chosen": e["answer"], "rejected": rejected}, ensure_ascii=False) + "\n")
    (OUT / "README.md").write_text(
        "# Bundled post-training set\n\nWritten for Levante by `scripts/make_post_corpus.py` (greetings, counting, "
        "repeating and reversing words, completing sentences of the bundled sample corpus) in 8 EU languages; "
        "released under CC0 1.0 (public domain dedication). Regenerate with `python scripts/make_post_corpus.py`.\n",
        encoding="utf-8")


if __name__ == "__main__":
    main()
