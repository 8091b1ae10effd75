"""A job-wide visual prompt (``run --box``) given to every listed image that has no prompts of its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from sam3_batch.contracts.schemas import ConceptPrompt
from sam3_batch.producer.sources import Source, SourceEntry, SourceItem


class WithPrompts:
    """Wraps a source: its items without prompts (a folder's, a manifest line's without any) get ``prompts``."""

    def __init__(self, source: Source, prompts: list[str | ConceptPrompt]) -> None:
        self.source = source
        # As a manifest line carries them (WorkItem validates them again): plain JSON values.
        self.prompts: list[str | dict[str, object]] = [
            p if isinstance(p, str) else p.model_dump(mode="json", exclude_none=True) for p in prompts
        ]

    def entries(self, start_after: str | None) -> Iterator[SourceEntry]:
        for entry in self.source.entries(start_after):
            if isinstance(entry, SourceItem) and entry.prompts is None:
                yield replace(entry, prompts=list(self.prompts))
            else:
                yield entry
