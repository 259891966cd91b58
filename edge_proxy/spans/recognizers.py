"""Built-in recognizers for protect rules: Presidio's pattern recognizers, configured to run offline.

Presidio's AnalyzerEngine would load (and try to download) a spaCy model at construction, so
Veil calls the recognizers themselves, which need no NLP engine. The e-mail recognizer checks
the domain's public suffix with tldextract, whose default fetches the suffix list from the
network on first use: Veil's subclass uses tldextract's bundled snapshot and never fetches.
PERSON needs a named-entity model; one is used only when installed locally (a spaCy package or
folder), never downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from functools import cached_property
from typing import Any, Protocol, Sequence

log = logging.getLogger("veil.edge.spans")

MIN_SCORE = 0.3  # Presidio scores: unvalidated phone patterns 0.4, checksummed cards and IBANs 1.0
# Regions whose national formats the phone recognizer accepts (international +CC numbers match anywhere).
PHONE_REGIONS = ("US", "GB", "CA", "AU", "IE", "DE", "FR", "NL", "BE", "ES", "IT", "PT", "CH", "AT", "SE", "NO",
                 "DK", "FI", "PL", "IN", "BR", "MX", "JP", "SG", "ZA", "NZ", "IL")
NER_CANDIDATES = ("en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm")


@dataclasses.dataclass(frozen=True, slots=True)
class Found:
    start: int
    end: int
    entity: str  # Presidio entity type, e.g. EMAIL_ADDRESS
    score: float


class Recognizer(Protocol):
    def find(self, text: str) -> list[Found]: ...


class _PresidioRecognizer:
    """One Presidio pattern recognizer, called without an NLP engine (no context words)."""

    def __init__(self, recognizer: Any, entity: str):
        self.recognizer, self.entity = recognizer, entity

    def find(self, text: str) -> list[Found]:
        results = self.recognizer.analyze(text, [self.entity], None)
        return [Found(r.start, r.end, self.entity, float(r.score)) for r in results if r.score >= MIN_SCORE]


class _SpacyPersons:
    """PERSON spans from a locally installed spaCy pipeline."""

    def __init__(self, nlp: Any):
        self.nlp = nlp

    def find(self, text: str) -> list[Found]:
        return [Found(e.start_char, e.end_char, "PERSON", 0.85) for e in self.nlp(text).ents if e.label_ == "PERSON"]


def _offline_email_recognizer() -> Any:
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    # suffix_list_urls=() and no cache dir: the snapshot shipped inside tldextract, never a fetch
    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return extract(pattern_text).fqdn != ""

    return OfflineEmailRecognizer()


def _presidio(entity: str) -> Any:
    from presidio_analyzer import predefined_recognizers as pr

    if entity == "EMAIL_ADDRESS":
        return _offline_email_recognizer()
    if entity == "PHONE_NUMBER":
        return pr.PhoneRecognizer(supported_regions=PHONE_REGIONS)
    return {"CREDIT_CARD": pr.CreditCardRecognizer, "IBAN_CODE": pr.IbanRecognizer, "IP_ADDRESS": pr.IpRecognizer,
            "US_SSN": pr.UsSsnRecognizer, "CRYPTO": pr.CryptoRecognizer}[entity]()


def installed_ner_model(preferred: str = "") -> str | None:
    """The spaCy pipeline to use for PERSON: `preferred` (a package name or a folder) or the first
    English pipeline installed; None when there is none. Only looks, never downloads."""
    from pathlib import Path

    if preferred:
        return preferred if Path(preferred).is_dir() or importlib.util.find_spec(preferred) else None
    return next((name for name in NER_CANDIDATES if importlib.util.find_spec(name) is not None), None)


class RecognizerSet:
    """The recognizers for a set of entity types, built once per policy version."""

    def __init__(self, entities: Sequence[str], ner_model: str = ""):
        self.entities = list(dict.fromkeys(entities))
        self.ner_model = ner_model

    @cached_property
    def recognizers(self) -> list[Recognizer]:
        out: list[Recognizer] = []
        for entity in self.entities:
            if entity != "PERSON":
                out.append(_PresidioRecognizer(_presidio(entity), entity))
                continue
            model = installed_ner_model(self.ner_model)
            if model is None:
                log.warning("protect rule asks for PERSON but no named-entity model is installed "
                            "(pip install a spaCy English pipeline, or set privacy.ner_model); "
                            "person names are found only by term and pattern rules")
                continue
            import spacy

            out.append(_SpacyPersons(spacy.load(model, exclude=["lemmatizer"])))
        return out

    @property
    def unavailable(self) -> list[str]:
        """Entity types asked for that no recognizer here can find (PERSON without a model)."""
        have = {r.entity for r in self.recognizers if isinstance(r, _PresidioRecognizer)}
        have |= {"PERSON" for r in self.recognizers if isinstance(r, _SpacyPersons)}
        return [e for e in self.entities if e not in have]

    def find(self, text: str) -> list[Found]:
        return [f for r in self.recognizers for f in r.find(text)]
