"""The offline personal-data analyzer behind ``data.pii`` (:mod:`lmtune.data.pii`): presidio, no downloads.

The NLP engine is ``spacy.blank("en")`` (tokens for context words; no pipeline is ever downloaded) and every
recognizer is self-contained:

- presidio's pattern recognizers with their validators: e-mail addresses (the domain checked against
  tldextract's bundled suffix list, never fetched), phone numbers (``phonenumbers``), card numbers (Luhn),
  IBANs (mod-97), IPv4/IPv6 addresses, URLs, crypto wallet addresses (checksum), US social security
  numbers, UK NI and NHS numbers (checksum), Italian fiscal codes, Spanish NIF, Polish PESEL, Finnish
  identity codes, Indian Aadhaar (Verhoeff) numbers;
- :class:`StreetAddressRecognizer`: house number + street words + a street suffix (US/UK style:
  ``221B Baker Street``, ``1600 Pennsylvania Ave NW``), or the continental order (``Via Roma 12``,
  ``Hauptstraße 5``);
- :class:`PersonNameRecognizer`: capitalised words that start with a title (``Mr. Darcy``) or with a first
  name from the 1990 US census lists shipped by the ``names`` package (``Jane Austen``, ``Elizabeth``).

What it misses (measured by ``benchmarks/bench_pii.py``): names in lower-cased text, surnames standing
alone, names that are common words (``Will``, ``May``) unless a surname follows, names outside the census
lists, street addresses without a house number.

Importing presidio costs about 0.5 s beside transformers (which it imports); building the analyzer about a
second more, once per process (:func:`analyzer_engine`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import names as census_names
import spacy
import tldextract
from presidio_analyzer import AnalyzerEngine, EntityRecognizer, Pattern, PatternRecognizer, RecognizerRegistry
from presidio_analyzer import RecognizerResult as AnalyzerResult
from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    CryptoRecognizer,
    EmailRecognizer,
    EsNifRecognizer,
    FiPersonalIdentityCodeRecognizer,
    IbanRecognizer,
    InAadhaarRecognizer,
    IpRecognizer,
    ItFiscalCodeRecognizer,
    NhsRecognizer,
    PhoneRecognizer,
    PlPeselRecognizer,
    UkNinoRecognizer,
    UrlRecognizer,
    UsSsnRecognizer,
)
from presidio_analyzer.predefined_recognizers.ner import HuggingFaceNerRecognizer
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import OperatorConfig
from presidio_anonymizer.entities import RecognizerResult as AnonymizerResult
from spacy.tokens import Doc

from lmtune.config.schema import PII_ENTITIES
from lmtune.errors import ConfigError

__all__ = ["Finding", "NerNameRecognizer", "NerNames", "PersonNameRecognizer", "PiiScanner", "StreetAddressRecognizer",
           "analyzer_engine", "first_names", "ner_names"]

# Masking character of the `mask` policy.
MASK_CHAR = "*"


class BlankSpacyEngine(SpacyNlpEngine):
    """presidio's spaCy engine over ``spacy.blank("en")``: tokens only, nothing downloaded.

    A blank pipeline has no lemmatizer, so each token's lower-cased text stands in for its lemma:
    presidio's context words ("card", "ssn", "phone") are matched against those.
    """

    def __init__(self) -> None:
        super().__init__(models=[{"lang_code": "en", "model_name": "blank:en"}])

    def load(self) -> None:
        """Build the blank English pipeline (never ``spacy.load``, which would look for a package)."""
        # presidio types `nlp` as None until loaded.
        self.nlp = {"en": spacy.blank("en")}  # type: ignore[assignment]

    def _doc_to_nlp_artifact(self, doc: Doc, language: str) -> NlpArtifacts:
        artifacts = super()._doc_to_nlp_artifact(doc, language)
        artifacts.lemmas = [token.lower_ for token in doc]
        return artifacts


# tldextract with its bundled public-suffix snapshot only: the default extractor fetches the list from the
# internet on first use (and caches it under ~/.cache).
_OFFLINE_TLD = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


class OfflineEmailRecognizer(EmailRecognizer):
    """presidio's e-mail recognizer, its domain checked against the bundled suffix list (no download)."""

    def validate_result(self, pattern_text: str) -> bool:
        """Whether the address ends in a known public suffix."""
        return _OFFLINE_TLD(pattern_text).fqdn != ""


class DashedSsnRecognizer(UsSsnRecognizer):
    """US social security numbers; the dashed form ``123-45-6789`` scores as a medium match.

    presidio scores every SSN form as very weak (0.05) until a context word appears; ``ddd-dd-dddd`` is
    rarely anything else, while phone numbers and dates use other groupings.
    """

    def __init__(self) -> None:
        dashed = Pattern("SSN dashed (medium)", r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", 0.5)
        super().__init__(patterns=[dashed, *UsSsnRecognizer.PATTERNS])


# Street suffixes (US/UK, full and USPS abbreviations) after the street's name, and the street words
# that come first on the continent.
_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Av|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Square|Sq|"
    r"Terrace|Ter|Way|Parkway|Pkwy|Highway|Hwy|Circle|Cir|Crescent|Close|Row|Mews|Gardens|Grove|Walk|Trail|"
    r"Plaza|Alley|Hill)\b\.?"
)
_CAP_WORD = r"[A-Z][A-Za-z'’\-]*"
_STREET_PATTERNS = [
    Pattern(
        "House number, street, suffix",
        r"\b\d{1,6}[A-Za-z]?,?\s+(?:(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\.?\s+)?"
        rf"(?:{_CAP_WORD}\s+){{1,3}}{_STREET_SUFFIX}"
        r"(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b\.?)?(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit|Flat|#)\.?\s*\w+)?",
        0.85,  # as high as a full name, so "12 King Street" is an address and not the name "King Street"
    ),
    Pattern(
        "Continental street, number",
        r"\b(?:Via|Viale|Piazza|Corso|Rue|Avenue|Boulevard|Calle|Avenida|Plaza|Rua|Praça|Straße|Strasse)\s+"
        rf"(?:(?:de|del|della|di|du|des|la|le|do|da)\s+)?(?:{_CAP_WORD}\s+){{0,2}}{_CAP_WORD},?\s+\d{{1,5}}[a-zA-Z]?\b",
        0.6,
    ),
    Pattern(
        "German compound street, number",
        r"\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|gasse|allee|platz|ring|damm)\s+\d{1,5}[a-zA-Z]?\b",
        0.6,
    ),
]


class StreetAddressRecognizer(PatternRecognizer):
    """Street addresses with a house number (presidio ships none): ``221B Baker Street``,
    ``1600 Pennsylvania Ave NW, Suite 4``, ``Via Roma 12``, ``Hauptstraße 5``."""

    def __init__(self) -> None:
        super().__init__(supported_entity="STREET_ADDRESS", patterns=_STREET_PATTERNS, supported_language="en",
                         context=["address", "street", "live", "lives", "located", "deliver", "ship", "home"],
                         # Case matters: capitalised street names are what tell them from "2 cats and walk".
                         global_regex_flags=re.DOTALL | re.MULTILINE)


# Titles that make the capitalised words after them a name.
_TITLES = frozenset({"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "professor", "sir", "dame", "lady", "lord",
                     "madam", "madame", "mme", "mlle", "colonel", "col", "captain", "capt", "rev", "reverend"})
# Census first names that are also common English words: a name only when a capitalised surname follows.
_AMBIGUOUS_FIRST = frozenset({
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "april", "august", "autumn", "june", "may", "summer", "winter", "dawn", "hope", "faith", "grace", "joy",
    "glory", "charity", "constance", "prudence", "patience", "mercy", "honor", "honour", "will", "bill", "mark",
    "art", "guy", "frank", "rich", "major", "king", "lee", "dean", "sage", "long", "young", "rose", "lily",
    "daisy", "ivy", "ruby", "pearl", "crystal", "amber", "violet", "iris", "jade", "olive", "fern", "holly",
    "hazel", "heather", "sunny", "christian", "christmas", "sterling", "royal", "earl", "duke", "prince",
    "marshall", "baron", "chase", "chance", "price", "gay", "page", "don", "ray", "sky", "star", "angel",
    "precious", "princess", "lady", "love", "dusty", "rusty", "sandy", "stormy", "misty", "in", "an", "so",
    "do", "go", "no", "man", "see", "say", "son", "sun", "sing", "penny", "bunny", "cookie", "candy", "ginger",
    "destiny", "genesis", "trinity", "miracle", "harmony", "melody", "unique", "liberty", "justice", "london",
    "paris", "florence", "georgia", "virginia", "carolina", "india", "china", "jordan", "israel"
})
_NAME_WORD = re.compile(r"[A-Z][a-z]+(?:['’\-][A-Za-z][a-z]+)*(?:['’]s)?|[A-Z]\.")
# A run of capitalised words; a dot may end a title (Mr.) or an initial (J.), never a name ("Jane. Will").
_RUN_WORD = r"(?:(?:Mr|Mrs|Ms|Mx|Dr|Prof|Capt|Col|Rev|Mme|Mlle)\.|[A-Z]\.|[A-Z][a-z]+(?:['’\-][A-Za-z][a-z]+)*)"
_CAPITALISED_RUN = re.compile(rf"\b{_RUN_WORD}(?:[ \t]+{_RUN_WORD})*")


@functools.cache
def first_names() -> frozenset[str]:
    """Lower-cased first names of the 1990 US census lists in the ``names`` package, less English stop words
    and names of two letters or fewer."""
    folder = Path(census_names.__file__).parent
    found: set[str] = set()
    for file in ("dist.male.first", "dist.female.first"):
        for line in (folder / file).read_text(encoding="ascii").splitlines():
            word = line.split(" ", 1)[0].strip().lower()
            if len(word) > 2:
                found.add(word)
    stop = spacy.blank("en").Defaults.stop_words
    return frozenset(found - stop)


_PERSON_RECOGNIZER = "PersonNameRecognizer"


class PersonNameRecognizer(EntityRecognizer):
    """Person names from capitalisation, titles and a first-name list (offline; no NER model).

    A run of capitalised words is a name when it starts with a title (``Mr. Darcy``, ``Lady Catherine de
    Bourgh`` up to its capitalised words) or with a census first name (``Jane Austen``; a lone ``Elizabeth``
    scores lower). First names that are common words (``Will``, ``May``, ``Grace``) count only with a
    capitalised word after them. A possessive ``'s`` is left outside the span.
    """

    def __init__(self) -> None:
        super().__init__(supported_entities=["PERSON"], supported_language="en", name=_PERSON_RECOGNIZER)

    def load(self) -> None:
        """Read the first-name list once."""
        first_names()

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
                ) -> list[AnalyzerResult]:
        """The name spans of ``text``."""
        if "PERSON" not in entities:
            return []
        known = first_names()
        results: list[AnalyzerResult] = []
        for run in _CAPITALISED_RUN.finditer(text):
            words = list(_NAME_WORD.finditer(run.group()))
            if not words:
                continue
            keys = [w.group().rstrip(".").lower().removesuffix("'s").removesuffix("’s") for w in words]
            begin = score = None
            for i, key in enumerate(keys):  # the first title or first name of the run ("But Mr. Knightley")
                if key in _TITLES and i + 1 < len(words):
                    begin, score = i, 0.85
                    break
                if key in known and (key not in _AMBIGUOUS_FIRST or i + 1 < len(words)):
                    begin, score = i, 0.85 if i + 1 < len(words) else 0.6
                    break
            if begin is None or score is None:
                continue
            last = min(len(words), begin + 4) - 1
            start = run.start() + words[begin].start()
            end = run.start() + words[last].end()
            token = words[last].group()
            if token.endswith(("'s", "’s")):
                end -= 2
            results.append(AnalyzerResult("PERSON", start, end, score,
                                          recognition_metadata={AnalyzerResult.RECOGNIZER_NAME_KEY: _PERSON_RECOGNIZER,
                                                                AnalyzerResult.RECOGNIZER_IDENTIFIER_KEY: self.id}))
        return results


# Entity labels (without B-/I-) that name people in common NER label sets, compared case-insensitively.
PERSON_LABELS = ("PER", "PERSON", "NAME")
_TAG_PREFIX = re.compile(r"^[BIESLU]-")


@dataclass(frozen=True)
class NerNames:
    """A token-classification model that finds person names (``data.pii_ner``): its folder and the labels of
    its entity types that are names."""

    folder: str
    labels: tuple[str, ...]


class NerNameRecognizer(HuggingFaceNerRecognizer):
    """Person names found by a token-classification model on disk (presidio's transformers NER recognizer,
    offline: a local folder, never a Hub name). A word takes its first sub-token's tag (aggregation "first": what
    lmtune's NER runs learn unless ``data.label_all_subtokens``). Its other entity types are left out; its score
    is the model's probability, which ``data.pii_score`` thresholds as any recognizer's."""

    def __init__(self, ner: NerNames) -> None:
        super().__init__(supported_entities=["PERSON"], name="lmtune NER names", supported_language="en",
                         model_name=ner.folder, label_mapping=dict.fromkeys(ner.labels, "PERSON"), threshold=0.0,
                         aggregation_strategy="first", device="cpu")

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
                ) -> list[AnalyzerResult]:
        return [r for r in super().analyze(text, entities, nlp_artifacts) if r.entity_type == "PERSON"]


def ner_entity_labels(config: dict[str, Any]) -> list[str]:
    """The entity types a token-classification model tags (its config's ``id2label`` without B-/I- and O)."""
    labels = [_TAG_PREFIX.sub("", str(v)) for v in (config.get("id2label") or {}).values()]
    return sorted({label for label in labels if label and label != "O"})


def ner_names(source: str, labels: list[str] | None) -> NerNames:
    """``data.pii_ner`` resolved: the model folder (a run folder's ``model/``) and its person-name labels;
    ConfigError naming the key when the folder is not a token-classification model or tags no names."""
    path = Path(source).expanduser()
    folder = next((p for p in (path, path / "model") if (p / "config.json").is_file()), None)
    if folder is None:
        raise ConfigError(f"data.pii_ner: {source} holds no model (no config.json there or in its model/ folder)",
                          hint="give an lmtune token_classification run folder, or a transformers token-"
                          "classification model folder")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.pii_ner: {folder / 'config.json'} cannot be read ({exc})") from None
    if not any(str(a).endswith("ForTokenClassification") for a in config.get("architectures") or []):
        raise ConfigError(f"data.pii_ner: {folder} is a {', '.join(config.get('architectures') or ['model'])}, not "
                          "a token-classification (NER) model", hint="give an lmtune token_classification run")
    known = ner_entity_labels(config)
    wanted = labels or [k for k in known if k.upper() in PERSON_LABELS]
    missing = [k for k in wanted if k not in known]
    if missing or not wanted:
        raise ConfigError(f"data.pii_ner: the model at {folder} tags {', '.join(known) or 'no entity types'}"
                          + (f", not {', '.join(missing)}" if missing else
                             f", none of them a person-name label ({', '.join(PERSON_LABELS)})"),
                          hint="name its person-name labels in data.pii_ner_labels")
    return NerNames(str(folder.resolve()), tuple(wanted))


def _recognizers() -> list[EntityRecognizer]:
    """Every recognizer the scanner runs (each entity of :data:`PII_ENTITIES` has one)."""
    recognizers: list[EntityRecognizer] = [
        OfflineEmailRecognizer(), PhoneRecognizer(), CreditCardRecognizer(), IbanRecognizer(), IpRecognizer(),
        UrlRecognizer(), CryptoRecognizer(), DashedSsnRecognizer(), UkNinoRecognizer(), NhsRecognizer(),
        ItFiscalCodeRecognizer(supported_language="en"), EsNifRecognizer(supported_language="en"),
        PlPeselRecognizer(supported_language="en"), FiPersonalIdentityCodeRecognizer(supported_language="en"),
        InAadhaarRecognizer(supported_language="en"), StreetAddressRecognizer(), PersonNameRecognizer(),
    ]
    covered = {e for r in recognizers for e in r.supported_entities}
    assert covered == set(PII_ENTITIES), covered ^ set(PII_ENTITIES)
    return recognizers


@functools.cache
def analyzer_engine(ner: NerNames | None = None) -> AnalyzerEngine:
    """The offline presidio analyzer (with ``ner``'s model as a name recognizer), built once per process and
    setting (building it takes about a second, loading a model more)."""
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in _recognizers():
        registry.add_recognizer(recognizer)
    if ner is not None:
        registry.add_recognizer(NerNameRecognizer(ner))
    nlp = BlankSpacyEngine()
    nlp.load()
    return AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"])


@functools.cache
def _anonymizer() -> AnonymizerEngine:
    return AnonymizerEngine()


# ---------------------------------------------------------------------------------------------- scanning
@dataclass(frozen=True)
class Finding:
    """One piece of personal data in a text: its type, character span and score."""

    entity: str
    start: int
    end: int
    score: float


# A quick test that a text may hold anything the recognizers look for: a digit, an @, a capital letter or
# a URL-ish dot. Lower-case prose without digits is skipped without running the analyzer.
_WORTH_SCANNING = re.compile(r"[0-9@A-Z]|www\.|\w\.\w")


class PiiScanner:
    """Find :data:`PII_ENTITIES` in texts with the offline analyzer, above a score threshold."""

    def __init__(self, entities: list[str] | tuple[str, ...] | None = None, score: float = 0.4,
                 ner: NerNames | None = None) -> None:
        self.entities = list(entities or PII_ENTITIES)
        self.score = score
        self.ner = ner
        self.engine = analyzer_engine(ner)

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in ``text``, in order (an overlap keeps the higher score, then the longer)."""
        if not text or (self.ner is None and not _WORTH_SCANNING.search(text)):  # a model may find lower-case names
            return []
        results = self.engine.analyze(text, language="en", entities=self.entities, score_threshold=self.score)
        ranked = sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start))
        kept: list[Finding] = []
        for r in ranked:
            end = r.end
            if r.entity_type == "URL":  # presidio's URL pattern takes a sentence's closing punctuation along
                end = r.start + len(text[r.start:end].rstrip(".,;:!?)]'\""))
            if end > r.start and all(end <= k.start or r.start >= k.end for k in kept):
                kept.append(Finding(r.entity_type, r.start, end, round(float(r.score), 3)))
        return sorted(kept, key=lambda f: f.start)

    def rewrite(self, text: str, findings: list[Finding], policy: str) -> str:
        """``text`` with each finding replaced by ``<TYPE>`` (redact) or masked character for character
        (mask: lengths, and so character offsets, stay as they were), by presidio's anonymizer."""
        if not findings:
            return text
        results = [AnonymizerResult(f.entity, f.start, f.end, f.score) for f in findings]
        if policy == "mask":
            operator = OperatorConfig("mask", {"masking_char": MASK_CHAR, "chars_to_mask": len(text),
                                               "from_end": False})
        else:
            operator = OperatorConfig("replace")  # <ENTITY_TYPE>
        return str(_anonymizer().anonymize(text, results, operators={"DEFAULT": operator}).text)


