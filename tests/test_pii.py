"""PII scrubbing: each identifier type replaced and counted; checksum-invalid look-alikes kept."""

from __future__ import annotations

import pytest

from levante.data.pii import PiiConfig, iban_valid, luhn_valid, scrub


def _iban_check_digits(country: str, bban: str) -> str:
    """ISO 13616 check digits, written independently of the module: 98 - (BBAN + CC + "00") mod 97."""
    num = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{98 - int(num) % 97:02d}"


def test_iban_checksum_against_an_independent_computation():
    for country, bban in [("DE", "370400440532013000"), ("FR", "20041010050500013M02606"),
                          ("NL", "ABNA0417164300"), ("MT", "MALT011000012345MTLCAST001S")]:
        good = country + _iban_check_digits(country, bban) + bban
        assert iban_valid(good), good
        bad = good[:2] + f"{(int(good[2:4]) + 1) % 100:02d}" + good[4:]
        assert not iban_valid(bad), bad


def test_luhn():
    assert luhn_valid("4111 1111 1111 1111")
    assert luhn_valid("5500-0000-0000-0004")
    assert not luhn_valid("4111 1111 1111 1112")
    assert not luhn_valid("1234")


POSITIVE = [
    ("email", "Schreiben Sie an anna.muster+news@beispiel.de bitte.", "Schreiben Sie an <EMAIL> bitte."),
    ("iban", "Konto DE89 3704 0044 0532 0130 00 bei der Bank.", "Konto <IBAN> bei der Bank."),
    ("iban", "IBAN: FR1420041010050500013M02606.", "IBAN: <IBAN>."),
    ("card", "Karte 4111 1111 1111 1111 gesperrt", "Karte <CARD> gesperrt"),
    ("card", "card 5500-0000-0000-0004.", "card <CARD>."),
    ("ipv4", "Server 192.168.10.254 antwortet", "Server <IPV4> antwortet"),
    ("ipv6", "host 2001:db8:85a3::8a2e:370:7334 up", "host <IPV6> up"),
    ("ipv6", "loopback ::1 ok", "loopback <IPV6> ok"),
    ("phone", "Ruf an: +49 30 1234567!", "Ruf an: <PHONE>!"),
    ("phone", "Tél. +33 (0)1 23 45 67 89 ou", "Tél. <PHONE> ou"),
    ("phone", "tel. +356 2122 3344.", "tel. <PHONE>."),
    ("phone", "Telefon 030 1234567 oder", "Telefon <PHONE> oder"),
    ("phone", "appelez le 01 23 45 67 89 demain", "appelez le <PHONE> demain"),
    ("phone", "chiamare 06-1234-5678 oggi", "chiamare <PHONE> oggi"),
    ("phone", "bel (020) 794 6095 nu", "bel <PHONE> nu"),
]


@pytest.mark.parametrize("kind,text,expected", POSITIVE)
def test_identifiers_are_replaced_and_counted(kind, text, expected):
    out, counts = scrub(text)
    assert out == expected
    assert counts == {kind: 1}


NEGATIVE = [
    "Konto DE89 3704 0044 0532 0130 01 bei der Bank.",  # IBAN with a wrong check digit
    "Karte 4111 1111 1111 1112 gesperrt",  # fails Luhn
    "Version 1.2.3 und Python 3.11",
    "Am 01.02.2023 um 12:30:45 Uhr",  # a date and a time, not phones or IPv6
    "Im Jahr 1999 hatte die Stadt 1 234 567 Einwohner.",
    "Artikel 12 Absatz 3, Seite 0 bis 15",
    "a@b is not an address, nor is user@localhost",
    "999.168.1.1 is not an IPv4 address",
    "Das Verhältnis war 3:2:1.",
]


@pytest.mark.parametrize("text", NEGATIVE)
def test_look_alikes_are_kept(text):
    out, counts = scrub(text)
    assert (out, dict(counts)) == (text, {})


def test_types_can_be_switched_off_and_counts_accumulate():
    text = "mail a@example.org or call +49 30 1234567"
    out, counts = scrub(text, PiiConfig(types=("email",)))
    assert out == "mail <EMAIL> or call +49 30 1234567" and counts == {"email": 1}
    total = counts
    scrub(text, counts=total)
    assert total == {"email": 2, "phone": 1}
    assert scrub(text, PiiConfig(enabled=False))[0] == text
