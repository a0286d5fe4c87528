"""GDPR scrubbing: personal identifiers replaced by typed placeholders, counted per type.

Candidates are found by regular expressions and then *validated* where the identifier carries a
checksum (IBAN: ISO 13616 mod-97; payment cards: Luhn; IPv6: the `ipaddress` parser), so invoice
numbers and version strings survive. Order matters: IBANs and cards are digit runs a phone pattern
would also match, so they are replaced first.

Not caught, on purpose: national phone numbers without a trunk prefix "0" (Spanish or Polish
"912 345 678" is indistinguishable from a number written with thousands separators) and dotted
dates-like national numbers ("01.02.2023").
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

PLACEHOLDERS = {"email": "<EMAIL>", "iban": "<IBAN>", "card": "<CARD>", "ipv6": "<IPV6>", "ipv4": "<IPV4>",
                "phone": "<PHONE>"}

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                  r"(?![\w]|\.\d)")
# +CC then groups (spaces, dots, hyphens, one optional "(0)" or area code in brackets): +49 30 1234567
PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){2,6}(?![\w])")
# trunk prefix 0, then groups separated by spaces, hyphens or slashes: 030 1234567, 01 23 45 67 89
PHONE_NATIONAL = re.compile(r"(?<![\w/.+-])(?:\(0\d{1,4}\)|0\d{1,4})(?:[ /-]?\d{2,8}){1,4}(?![\w/-])")


def iban_valid(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    digits = "".join(str(int(c, 36)) for c in rearranged)  # A=10 ... Z=35
    return int(digits) % 97 == 1


def luhn_valid(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ipv6_valid(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


@dataclass
class PiiConfig:
    enabled: bool = True
    types: tuple[str, ...] = tuple(PLACEHOLDERS)  # which identifiers to scrub


_RULES = (
    ("email", EMAIL, None),
    ("iban", IBAN, iban_valid),
    ("card", CARD, luhn_valid),
    ("ipv6", IPV6, _ipv6_valid),
    ("ipv4", IPV4, None),
    ("phone", PHONE_INTL, lambda s: 8 <= _digits(s) <= 15),
    ("phone", PHONE_NATIONAL, lambda s: 8 <= _digits(s) <= 13),
)


def scrub(text: str, config: PiiConfig | None = None, counts: Counter | None = None) -> tuple[str, Counter]:
    """`text` with every validated identifier replaced by its placeholder, and counts per type."""
    config = config or PiiConfig()
    counts = Counter() if counts is None else counts
    if not config.enabled:
        return text, counts
    for kind, pattern, valid in _RULES:
        if kind not in config.types:
            continue

        def replace(m: re.Match, kind=kind, valid=valid) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text, counts
