"""The guideline library: what a chatbot should do once a message is flagged, per category and per topic.

Following the guideline-library idea (Guide-Align): the guard does not only say "medical-advice", it hands
the chatbot concrete instructions to put into its prompt. A library is a versioned YAML file; the team's
defaults ship in `guardloop/core/guidelines/default.yaml`, operators may point `guidelines_path` at their own.

Every harmful category needs an entry (a flagged text must always get guidance); optional topic entries
refine it and are picked by keywords found in the text, which costs microseconds on the hot path.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from guardloop.core.labels import HARMFUL_BY_SEVERITY, HARMFUL_LABELS
from guardloop.core.yaml_files import YamlFileError, read_yaml

DEFAULT_LIBRARY_PATH = Path(__file__).parent / "guidelines" / "default.yaml"
# A note, not a hard limit of YAML: an operator's file this large is almost certainly the wrong file.
MAX_LIBRARY_BYTES = 1_048_576


# Punctuation becomes a word break; str.translate + split runs in C, about 20 times faster than a regex
# tokenizer, which matters for 4,000-character texts on the /classify path.
# Typographic quotes and dashes, as escapes: curly apostrophes are common in chat text.
_TYPOGRAPHIC = "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026\u2013\u2014\u00bf\u00a1"
_PUNCTUATION_TO_SPACE = str.maketrans(dict.fromkeys(string.punctuation + _TYPOGRAPHIC, " "))


def words_of(text: str) -> list[str]:
    """Lower-cased words without punctuation: "Can't breathe!" -> ["can", "t", "breathe"]."""
    return text.casefold().translate(_PUNCTUATION_TO_SPACE).split()


@dataclass(frozen=True)
class WordIndex:
    """A text prepared once for keyword lookups by every topic of every flagged category."""

    words: frozenset[str]
    joined: str  # " word word ... ": a phrase matches as the substring " its words "

    @classmethod
    def of(cls, text: str) -> WordIndex:
        words = words_of(text)
        return cls(frozenset(words), " " + " ".join(words) + " ")

    def contains(self, phrase: str) -> bool:
        """`phrase` is a keyword already in words_of form, joined by single spaces."""
        return phrase in self.words if " " not in phrase else f" {phrase} " in self.joined


class GuidelineError(Exception):
    """A guideline library that cannot be used; the message names the file and what to fix."""


def _non_empty_lines(values: list[str]) -> list[str]:
    cleaned = [" ".join(value.split()) for value in values]
    if any(not value for value in cleaned):
        raise ValueError("entries must not be empty")
    return cleaned


class TopicGuideline(BaseModel):
    """A finer entry inside a category, chosen when the flagged text mentions one of its keywords."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="stable name, e.g. 'medication-dose'")
    title: str = Field(min_length=1)
    keywords: list[str] = Field(min_length=1, description="words or phrases, matched case-insensitively")
    instructions: list[str] = Field(min_length=1, description="added after the category's instructions")

    _clean_lists = field_validator("keywords", "instructions")(_non_empty_lines)

    @field_validator("keywords")
    @classmethod
    def _keywords_have_words(cls, values: list[str]) -> list[str]:
        for value in values:
            if not words_of(value):
                raise ValueError(f"keyword {value!r} has no letters or digits")
        return values

    @cached_property
    def phrases(self) -> frozenset[str]:
        # Whole words only ("cut" never matches "shortcut"); case, spacing and punctuation do not matter, so
        # "self-harm" and "self harm" are one keyword.
        return frozenset(" ".join(words_of(keyword)) for keyword in self.keywords)

    def hits(self, text: str | WordIndex) -> int:
        """How many different keywords of this topic occur in `text`."""
        index = text if isinstance(text, WordIndex) else WordIndex.of(text)
        return sum(index.contains(phrase) for phrase in self.phrases)


class CategoryGuideline(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = Field(min_length=1)
    summary: str = Field(min_length=1, description="one sentence: the stance the chatbot should take")
    instructions: list[str] = Field(min_length=1, description="what to do, in order")
    avoid: list[str] = Field(default_factory=list, description="what never to do")
    resources: list[str] = Field(default_factory=list, description="hotlines, services, professionals to name")
    topics: list[TopicGuideline] = Field(default_factory=list)

    _clean_lists = field_validator("instructions", "avoid", "resources")(_non_empty_lines)

    def best_topic(self, text: str | WordIndex) -> TopicGuideline | None:
        """The topic with the most distinct keyword hits; ties go to the one listed first; None without hits."""
        best, best_hits = None, 0
        for topic in self.topics:
            hits = topic.hits(text)
            if hits > best_hits:
                best, best_hits = topic, hits
        return best


class Guidance(BaseModel):
    """What the chatbot should do for one flagged category (the category's entry, refined by a topic)."""

    category: str
    topic: str | None = Field(description="id of the topic entry that matched the text, if any")
    title: str
    summary: str
    instructions: list[str]
    avoid: list[str]
    resources: list[str]
    library_version: str


class GuidelineLibrary(BaseModel):
    """A whole library file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1, description="the library's own version, reported with every guidance")
    description: str = ""
    categories: dict[str, CategoryGuideline]

    @model_validator(mode="after")
    def _covers_every_harmful_category(self) -> GuidelineLibrary:
        unknown = sorted(set(self.categories) - set(HARMFUL_LABELS))
        if unknown:
            raise ValueError(
                f"unknown categories {', '.join(unknown)}; use the harmful labels {', '.join(HARMFUL_LABELS)}"
            )
        missing = [label for label in HARMFUL_LABELS if label not in self.categories]
        if missing:
            raise ValueError(f"no entry for {', '.join(missing)}; every harmful category needs guidance")
        for label, entry in self.categories.items():
            ids = [topic.id for topic in entry.topics]
            duplicates = sorted({topic_id for topic_id in ids if ids.count(topic_id) > 1})
            if duplicates:
                raise ValueError(f"categories.{label}: topic ids {', '.join(duplicates)} appear more than once")
        return self

    def guidance(self, category: str, text: str | WordIndex) -> Guidance:
        entry = self.categories[category]
        topic = entry.best_topic(text)
        return Guidance(
            category=category,
            topic=topic.id if topic else None,
            title=topic.title if topic else entry.title,
            summary=entry.summary,
            instructions=[*entry.instructions, *(topic.instructions if topic else ())],
            avoid=list(entry.avoid),
            resources=list(entry.resources),
            library_version=self.version,
        )

    def guidance_for(self, categories: tuple[str, ...] | list[str], text: str) -> list[Guidance]:
        """Guidance for each flagged category, most severe first (see HARMFUL_BY_SEVERITY)."""
        ordered = sorted(set(categories), key=HARMFUL_BY_SEVERITY.index)
        index = WordIndex.of(text) if ordered else None
        return [self.guidance(category, index) for category in ordered if index is not None]


def load_library(path: Path) -> GuidelineLibrary:
    """Read and validate a library file; every problem is a GuidelineError naming the file and the place."""
    try:
        data = read_yaml(path, max_bytes=MAX_LIBRARY_BYTES)
    except YamlFileError as exc:
        raise GuidelineError(str(exc)) from exc
    if not isinstance(data, dict):
        raise GuidelineError(f"{path}: expected a mapping with 'version' and 'categories', got {type(data).__name__}")
    try:
        return GuidelineLibrary.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "library"
            problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        raise GuidelineError(f"{path}: {'; '.join(problems)}") from exc


def default_library() -> GuidelineLibrary:
    return load_library(DEFAULT_LIBRARY_PATH)
