"""Precision and recall of ``data.pii``'s scanner (``lmtune data scan``) on a labelled sample, and its speed.

The sample (``benchmarks/data/pii_sample.jsonl``, built by ``--build``) has two parts:

- **names in real prose**: 150 paragraphs of Jane Austen (the bundled ``janeausten`` set: 50 each from Pride
  and Prejudice, Emma and Persuasion, 80-300 characters, paragraphs 20-70 of each book). Person names were
  labelled by hand: :data:`AUSTEN_PERSONS` lists every character name that occurs in them (a title before a
  name joins its span; "Long" counts only as "Mrs. Long", "Prince" only as "Miss Prince"); place and house
  names (Netherfield, Highbury, Kellynch Hall, Uppercross Cottage), days, months and "Admiral" alone are not
  names.
- **real-format personal data in real sentences**: 300 English chatterbot-corpus sentences (the bundled
  ``chatterbot`` set), each followed by one planted value: e-mail addresses, phone numbers (US, UK, German,
  French, international), card numbers (Luhn-valid Visa, Mastercard, Amex), IBANs (DE, GB, FR, IT, ES, NL,
  mod-97 valid), IPv4/IPv6 addresses, URLs, US SSNs, UK NHS numbers (mod 11), street addresses, and person
  names that are *not* in the census lists the name recognizer uses (Siobhan, Oluwaseun, ...); and 60 with a
  near miss that is not personal data (Luhn-failing numbers, IBANs with wrong check digits, dates, prices,
  versions, ISBNs). The planted values' labels are exact by construction; the few person names in the
  carrier sentences (Anne Frank, Tom Cruise, ...) were labelled by hand (:data:`CARRIER_PERSONS`).

A finding counts as a true positive when it overlaps a labelled span of the same type (any overlap is a leak
found); a labelled span no finding of its type overlaps is a miss. Speed: the sample's rows per second, and
10,000 Rotten Tomatoes snippets (lower-case: most skip the analyzer) and 10,000 Austen paragraphs.

    python benchmarks/bench_pii.py                  # scores and speed
    python benchmarks/bench_pii.py --build          # rebuild the sample (deterministic)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "benchmarks" / "data" / "pii_sample.jsonl"

# Hand-labelled: every person name in the selected Austen paragraphs (see the module docstring).
AUSTEN_PERSONS = [
    "Anne", "Harriet", "Elizabeth", "Emma", "Mary", "Bingley", "Darcy", "Bennet", "Bennets", "Elton", "Knightley",
    "Russell", "Kitty", "Lizzy", "Lucas", "Lucases", "Jane", "Eliza", "Weston", "Woodhouse", "Goddard",
    "Musgrove", "Musgroves", "Wentworth", "Charlotte", "Martin", "Smith", "Croft", "Crofts", "Lydia", "Hurst",
    "Robinson", "Taylor", "Frank", "Churchill", "Perrys", "Nash", "Richardson", "John", "Shepherd", "Walter",
    "Charles", "Pooles", "Richard", "Dick", "Henrietta", "Louisa", "Harville", "Benwick", "Elliot", "Clay",
    "Perry", "Bates", "Fairfax", "Campbell", "Dixon", "Cole", "Cox", "Hawkins", "Suckling", "Gardiner",
    "Collins", "Wickham", "Phillips", "Philips", "Forster", "Denny", "Fitzwilliam", "Georgiana", "Catherine",
    "Bourgh", "Maria", "Reynolds", "Wallis", "Dalrymple", "Carteret", "Atkinson", "Hayter", "Mullins",
]
TITLED_ONLY = {"Long", "Prince"}  # names only after a title
# Hand-labelled: the person names in the chatterbot sentences that carry the planted values.
CARRIER_PERSONS = ["Anne Frank", "Ben Franklin", "Cher Horowitz", "Derek Jeter", "Mark Zuckerberg", "Tom Cruise",
                   "Mrs. Smith"]
TITLES = r"(?:Mr|Mrs|Miss|Ms|Lady|Sir|Captain|Admiral|Colonel|Dr)\.?"

# Person names outside the 1990 US census first-name lists (the recognizer's), planted to measure misses.
OTHER_NAMES = [
    "Siobhan O'Connor", "Oluwaseun Adeyemi", "Priya Ramanathan", "Nguyen Van Anh", "Zbigniew Kowalczyk",
    "Aoife Brennan", "Tanvir Hossain", "Sven Lindqvist", "Giulia Bianchi", "Matteo Ferrari", "Chiara Esposito",
    "Jürgen Weber", "Søren Kierkegaard", "Thandiwe Nkosi", "Kwame Mensah", "Yusuf Demir", "Olamide Bakare",
    "Ngozi Okonjo", "Hiroshi Tanaka", "Mei-Ling Chen", "Anaïs Dubois", "Björn Svensson", "Dmitri Volkov",
    "Fatima Zahra", "Leilani Kahale", "Ravi Shankar", "Oisín Murphy", "Malak Haddad", "Tadeusz Nowak",
    "Eleni Papadopoulos",
]
FIRST = ["james", "mary", "robert", "linda", "michael", "susan", "david", "karen", "thomas", "nancy", "paul",
         "laura", "mark", "emily", "peter", "claire", "helen", "oliver", "sophie", "daniel"]
LAST = ["smith", "johnson", "walker", "hughes", "bennett", "carter", "murphy", "price", "reed", "cooper",
        "foster", "hayes", "bryant", "russell", "griffin", "harper", "lawson", "fleming", "porter", "doyle"]
DOMAINS = ["gmail.com", "outlook.com", "yahoo.co.uk", "web.de", "example.org", "proton.me", "uni-bonn.de",
           "company.co.uk"]
STREETS = ["Maple", "Oak", "Baker", "Elm", "Church", "High", "Station", "Park", "Mill", "Victoria", "King",
           "Queen", "Cedar", "Pine", "Washington", "Lincoln", "Madison", "Chestnut"]
SUFFIXES = ["Street", "St", "Avenue", "Ave", "Road", "Rd", "Lane", "Drive", "Boulevard", "Close", "Way",
            "Terrace", "Court", "Place"]

# Carriers: what is said before the planted value (some with the recognizers' context words, some without).
LEADS = {
    "EMAIL_ADDRESS": ["You can write to", "Email me at", "Contact:", "Forward it to"],
    "PHONE_NUMBER": ["Call me on", "My phone number is", "Ring", "Reach the office at", "Tel."],
    "CREDIT_CARD": ["My card number is", "Charge it to", "Paid with", "Card:"],
    "IBAN_CODE": ["Transfer it to IBAN", "Account:", "Send the money to", "Bank details:"],
    "IP_ADDRESS": ["The server is at", "Login came from", "Host:", "Ping"],
    "URL": ["See", "More at", "Details on", "Link:"],
    "US_SSN": ["My SSN is", "Social security number:", "Employee id", "Ref"],
    "UK_NHS": ["My NHS number is", "Patient number", "NHS no.", "Ref"],
    "STREET_ADDRESS": ["I live at", "Deliver to", "The office moved to", "Meet me at"],
    "PERSON": ["This was written by", "Ask", "I spoke with", "Signed,"],
}
NEAR_MISSES = [
    "Order 4111 1111 1111 1112 was refused.", "Ticket 5500 0000 0000 0005 is closed.",
    "Transfer ref DE89 3704 0044 0532 0130 01 failed.", "Invoice dated 12/05/2021 came to $1,299.99.",
    "Upgrade to v2.3.1 before 10:30.", "ISBN 978-0-14-143951-8 is the Penguin edition.",
    "Room 404 on floor 3.", "Flight BA 2490 leaves at 18:45.", "The score was 3-1 after 90 minutes.",
    "Batch 20230115-0042 passed QA.", "Call extension 4412 for help.", "Part no. 7781-22-90 is back in stock.",
]


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    """A Luhn-valid card number of ``length`` digits starting with ``prefix``."""
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return body + str((10 - total % 10) % 10)


def iban(country: str, bban: str) -> str:
    """An IBAN with correct mod-97 check digits."""
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


def nhs_number(rng: random.Random) -> str:
    """A UK NHS number with a valid mod-11 check digit, written 3-3-4."""
    while True:
        digits = [rng.randrange(10) for _ in range(9)]
        check = 11 - sum(d * (10 - i) for i, d in enumerate(digits)) % 11
        check = 0 if check == 11 else check
        if check != 10:
            s = "".join(map(str, digits)) + str(check)
            return f"{s[:3]} {s[3:6]} {s[6:]}"


def make_value(kind: str, rng: random.Random) -> str:
    """One real-format value of ``kind``."""
    if kind == "EMAIL_ADDRESS":
        sep = rng.choice([".", "_", ""])
        return f"{rng.choice(FIRST)}{sep}{rng.choice(LAST)}{rng.choice(['', str(rng.randrange(99))])}@" \
               f"{rng.choice(DOMAINS)}"
    if kind == "PHONE_NUMBER":
        n = rng.randrange(100)
        return rng.choice([f"(212) 555-01{n:02d}", f"+1 415-555-01{n:02d}", f"020 7946 0{n:03d}",
                           f"+44 20 7946 0{n:03d}", f"+49 30 1234 56{n:02d}", f"+33 1 42 68 53 {n:02d}",
                           f"617.555.01{n:02d}", f"+91 98765 432{n:02d}"])
    if kind == "CREDIT_CARD":
        number = rng.choice([luhn_complete("4", 16, rng), luhn_complete(str(rng.randint(51, 55)), 16, rng),
                             luhn_complete(rng.choice(["34", "37"]), 15, rng)])
        if len(number) == 16:
            return rng.choice([" ", "-", ""]).join(number[i:i + 4] for i in range(0, 16, 4))
        return number if rng.random() < 0.5 else f"{number[:4]} {number[4:10]} {number[10:]}"
    if kind == "IBAN_CODE":
        def digits(k: int) -> str:
            return "".join(str(rng.randrange(10)) for _ in range(k))
        country, bban = rng.choice([("DE", digits(18)), ("GB", "NWBK" + digits(14)), ("FR", digits(23)),
                                    ("IT", "X" + digits(22)), ("ES", digits(20)), ("NL", "ABNA" + digits(10))])
        value = iban(country, bban)
        return " ".join(value[i:i + 4] for i in range(0, len(value), 4)) if rng.random() < 0.6 else value
    if kind == "IP_ADDRESS":
        if rng.random() < 0.8:
            return ".".join(str(x) for x in (rng.randint(11, 223), rng.randrange(256), rng.randrange(256),
                                             rng.randint(1, 254)))
        return "2001:db8:" + ":".join(f"{rng.randrange(65536):x}" for _ in range(3)) + "::" + f"{rng.randrange(999)}"
    if kind == "URL":
        word = rng.choice(["travelnotes", "myshop", "janedoe-photos", "cityclinic", "localnews", "familytree"])
        return rng.choice([f"https://www.{word}.com/profile/{rng.randrange(9999)}", f"http://{word}.org",
                           f"www.{word}.net/about", f"https://{word}.co.uk/?id={rng.randrange(99999)}"])
    if kind == "US_SSN":
        area = rng.choice([x for x in range(1, 900) if x != 666])
        return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    if kind == "UK_NHS":
        return nhs_number(rng)
    if kind == "STREET_ADDRESS":
        if rng.random() < 0.8:
            return f"{rng.randint(1, 2400)} {rng.choice(STREETS)} {rng.choice(SUFFIXES)}"
        return rng.choice([f"Via {rng.choice(['Garibaldi', 'Roma', 'Mazzini'])} {rng.randint(1, 120)}",
                           f"{rng.choice(['Haupt', 'Bahnhof', 'Linden'])}straße {rng.randint(1, 90)}"])
    if kind == "PERSON":
        return rng.choice(OTHER_NAMES)
    raise ValueError(kind)


def carrier_names(sentence: str) -> list[dict[str, Any]]:
    """The hand-labelled person names (:data:`CARRIER_PERSONS`) in a carrier sentence."""
    pattern = "|".join(map(re.escape, CARRIER_PERSONS))
    return [{"start": m.start(), "end": m.end(), "type": "PERSON"} for m in re.finditer(rf"\b(?:{pattern})\b", sentence)]


def build() -> list[dict[str, Any]]:
    """The labelled sample (deterministic), written to :data:`SAMPLE`."""
    from lmtune.data.readers import read_table

    rows: list[dict[str, Any]] = []
    austen = read_table("bundled:janeausten").rows
    names = "|".join(sorted(map(re.escape, AUSTEN_PERSONS), key=len, reverse=True))
    person = re.compile(rf"\b(?:{TITLES}\s+)?(?:{names})(?:\s+(?:{names}))*\b"
                        rf"|\b{TITLES}\s+(?:{'|'.join(TITLED_ONLY)})\b")
    for book in ("Pride and Prejudice", "Emma", "Persuasion"):
        paragraphs = [r["text"] for r in austen if r.get("book") == book and 80 <= len(r["text"]) <= 300][20:70]
        for i, text in enumerate(paragraphs):
            spans = [{"start": m.start(), "end": m.end(), "type": "PERSON"} for m in person.finditer(text)]
            rows.append({"id": f"austen-{book[:4].lower()}-{i}", "part": "austen", "text": text, "entities": spans})
    rng = random.Random(0)
    chat = [m["content"] for r in read_table("bundled:chatterbot").rows for m in r["messages"]
            if m["role"] == "user" and 15 <= len(m["content"]) <= 120]
    kinds = list(LEADS)
    for i in range(300):
        kind = kinds[i % len(kinds)]
        value = make_value(kind, rng)
        sentence = rng.choice(chat).rstrip()
        lead = rng.choice(LEADS[kind])
        prefix = f"{sentence} {lead} "
        text = f"{prefix}{value}{rng.choice(['.', '', ' please.', ' today.'])}"
        rows.append({"id": f"planted-{i}", "part": "planted", "text": text, "entities": [
            *carrier_names(sentence), {"start": len(prefix), "end": len(prefix) + len(value), "type": kind}]})
    for i in range(60):
        sentence = rng.choice(chat).rstrip()
        text = f"{sentence} {NEAR_MISSES[i % len(NEAR_MISSES)]}"
        rows.append({"id": f"near-miss-{i}", "part": "near_miss", "text": text, "entities": carrier_names(sentence)})
    SAMPLE.parent.mkdir(parents=True, exist_ok=True)
    SAMPLE.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def score(rows: list[dict[str, Any]], scan: Any) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]], float]:
    """Per-type precision, recall, F1 and counts (overlap matching), the errors, and rows per second."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    started = time.perf_counter()
    found_all = [scan.find(r["text"]) for r in rows]
    rows_per_second = len(rows) / (time.perf_counter() - started)
    for row, found in zip(rows, found_all, strict=True):
        gold = row["entities"]
        for f in found:
            if any(g["type"] == f.entity and f.start < g["end"] and f.end > g["start"] for g in gold):
                tp[f.entity] += 1
            else:
                fp[f.entity] += 1
                errors.append({"id": row["id"], "kind": "false positive", "type": f.entity,
                               "text": row["text"][f.start:f.end]})
        for g in gold:
            if not any(f.entity == g["type"] and f.start < g["end"] and f.end > g["start"] for f in found):
                fn[g["type"]] += 1
                errors.append({"id": row["id"], "kind": "missed", "type": g["type"],
                               "text": row["text"][g["start"]:g["end"]]})
    table: dict[str, dict[str, float]] = {}
    for kind in sorted(set(tp) | set(fp) | set(fn)):
        p = tp[kind] / max(tp[kind] + fp[kind], 1)
        r = tp[kind] / max(tp[kind] + fn[kind], 1)
        table[kind] = {"precision": round(p, 3), "recall": round(r, 3),
                       "f1": round(2 * p * r / max(p + r, 1e-9), 3), "tp": tp[kind], "fp": fp[kind], "fn": fn[kind]}
    t, f_p, f_n = sum(tp.values()), sum(fp.values()), sum(fn.values())
    p, r = t / max(t + f_p, 1), t / max(t + f_n, 1)
    table["ALL"] = {"precision": round(p, 3), "recall": round(r, 3), "f1": round(2 * p * r / max(p + r, 1e-9), 3),
                    "tp": t, "fp": f_p, "fn": f_n}
    return table, errors, rows_per_second


def speed(scan: Any, texts: list[str]) -> float:
    """Rows per second of the scanner over ``texts``."""
    started = time.perf_counter()
    for text in texts:
        scan.find(text)
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    """Score the scanner on the sample and time it; print a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="Rebuild the labelled sample first.")
    parser.add_argument("--score", type=float, default=0.4, help="The scanner's threshold (data.pii_score).")
    parser.add_argument("--errors", type=int, default=30, help="Errors to list.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from lmtune.data.pii import scanner
    from lmtune.data.readers import read_table

    rows = build() if args.build or not SAMPLE.is_file() else [
        json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    t0 = time.perf_counter()
    scan = scanner(None, args.score)
    scan.find("warm up: John Smith, john@example.com")
    build_seconds = time.perf_counter() - t0
    table, errors, sample_rate = score(rows, scan)
    parts = {part: score([r for r in rows if r["part"] == part], scan)[0]["ALL"]
             for part in ("austen", "planted", "near_miss")}
    rotten = [r["text"] for r in read_table("bundled:rotten_tomatoes").rows][:10_000]
    austen = [r["text"] for r in read_table("bundled:janeausten").rows][:10_000]
    result = {"rows": len(rows), "labelled_entities": sum(len(r["entities"]) for r in rows), "score": args.score,
              "per_type": table, "per_part": parts, "analyzer_build_seconds": round(build_seconds, 2),
              "rows_per_second": {"sample": round(sample_rate), "rotten_tomatoes_10k": round(speed(scan, rotten)),
                                  "janeausten_10k": round(speed(scan, austen))}}
    print(f"{'type':<16}{'precision':>10}{'recall':>8}{'f1':>7}{'tp':>6}{'fp':>5}{'fn':>5}")
    for kind, m in table.items():
        print(f"{kind:<16}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>7.3f}{m['tp']:>6}{m['fp']:>5}{m['fn']:>5}")
    print("per part:", json.dumps(parts))
    print("rows/s:", json.dumps(result["rows_per_second"]), f"(analyzer built in {build_seconds:.1f} s)")
    for e in errors[:args.errors]:
        print(f"  {e['kind']:<15}{e['type']:<16}{e['id']:<22}{e['text']!r}")
    if args.out:
        args.out.write_text(json.dumps({**result, "errors": errors}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
