"""Sentence splitting for `tools/preprocess_data.py --split-sentences` (Megatron's sentence-level datasets).

Megatron-LM splits with NLTK's punkt model, which must be downloaded first (a failure on offline
clusters); megaclm uses pysbd, a rule-based splitter that needs no data files. `--lang` takes NLTK's
language names (english, german, ...) as Megatron does, or pysbd's ISO codes.

    split_sentences("Dr. Smith came. He sat.", "english")  -> ["Dr. Smith came.", "He sat."]

Sentences are stripped of surrounding whitespace (as punkt returns them) unless `keep_newlines`,
which keeps each sentence's text exactly, so the sentences of a document concatenate back to it.
"""
from __future__ import annotations

import functools

import pysbd

from megaclm.utils.errors import UserError

# NLTK's punkt language names -> pysbd's codes, for the languages both know.
NLTK_NAMES = {"english": "en", "german": "de", "french": "fr", "spanish": "es", "italian": "it", "dutch": "nl",
              "danish": "da", "polish": "pl", "russian": "ru", "greek": "el", "czech": "cs"}


def language_code(lang: str) -> str:
    code = NLTK_NAMES.get(lang, lang)
    if code not in pysbd.languages.LANGUAGE_CODES:
        known = sorted(set(NLTK_NAMES) | set(pysbd.languages.LANGUAGE_CODES))
        raise UserError(f"--lang {lang!r} has no sentence splitter; use one of {', '.join(known)}")
    return code


@functools.lru_cache(maxsize=None)
def _segmenter(code: str) -> pysbd.Segmenter:
    return pysbd.Segmenter(language=code, clean=False)


def split_sentences(text: str, lang: str = "english", keep_newlines: bool = False) -> list[str]:
    """The non-empty sentences of `text`, in order."""
    parts = _segmenter(language_code(lang)).segment(text)
    if not keep_newlines:
        parts = [p.strip() for p in parts]
    return [p for p in parts if p.strip()]
