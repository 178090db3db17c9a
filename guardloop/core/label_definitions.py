"""What each label means for reviewers: a definition, where it ends, and one or two short examples per label.

The team's file ships in `guardloop/core/guidelines/label_definitions.yaml`; operators may point
`review_definitions_path` at their own. The review page shows them on demand, so reviewers label by the same
definitions the model is trained to, not by their own reading of a label's name.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from guardloop.core.labels import LABELS

DEFAULT_DEFINITIONS_PATH = Path(__file__).parent / "guidelines" / "label_definitions.yaml"
# Examples are read in a second between two items: a long one is a paragraph no one reads.
MAX_EXAMPLE_CHARS = 200


class DefinitionsError(Exception):
    """A definitions file that cannot be used; the message names the file and what to fix."""


class LabelDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    definition: str = Field(min_length=1, max_length=400)
    not_this: str = Field("", max_length=400, description="where the label ends: what belongs to another label")
    examples: list[str] = Field(min_length=1, max_length=2, description="one or two short, invented examples")

    @field_validator("examples")
    @classmethod
    def _short(cls, examples: list[str]) -> list[str]:
        for example in examples:
            if not example.strip() or len(example) > MAX_EXAMPLE_CHARS:
                raise ValueError(f"each example needs 1 to {MAX_EXAMPLE_CHARS} characters")
        return examples


class LabelDefinitions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    labels: dict[str, LabelDefinition]

    @field_validator("labels")
    @classmethod
    def _every_label(cls, labels: dict[str, LabelDefinition]) -> dict[str, LabelDefinition]:
        missing = [label for label in LABELS if label not in labels]
        unknown = [label for label in labels if label not in LABELS]
        if missing or unknown:
            raise ValueError(
                f"list exactly the six labels ({', '.join(LABELS)}); "
                f"missing: {', '.join(missing) or 'none'}; unknown: {', '.join(unknown) or 'none'}"
            )
        return labels

    def in_label_order(self) -> list[tuple[str, LabelDefinition]]:
        return [(label, self.labels[label]) for label in LABELS]


@lru_cache(maxsize=4)
def load_definitions(path: Path | None = None) -> LabelDefinitions:
    """The definitions in `path` (the team's file when None), validated; cached per path (the file is read once)."""
    source = path or DEFAULT_DEFINITIONS_PATH
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DefinitionsError(f"cannot read label definitions {source}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise DefinitionsError(f"label definitions {source} are not valid YAML: {exc}") from None
    try:
        return LabelDefinitions.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise DefinitionsError(f"label definitions {source}: {where}: {first['msg']}") from None
