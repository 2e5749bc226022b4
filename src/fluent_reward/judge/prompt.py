"""What is sent to the judge apart from the record: the ``Prompt`` (system blocks, forced tool, request params) and
the local token estimate used when ``count_tokens`` is not available."""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fluent_reward.config import JudgeConfig, Rubric
from fluent_reward.rubric import TOOL_NAME, prompt_version, render_system_prompt, tool_definition

# Local token estimate when count_tokens is not available: Claude's tokenizer averages about 3.5 characters per
# token on Latin-script text and about one token per CJK character.
CHARS_PER_TOKEN = 3.5
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")  # kana, CJK ideographs, hangul


def estimate_tokens(text: str) -> int:
    """A local token estimate: one per CJK character, one per 3.5 other characters."""
    cjk = len(_CJK.findall(text))
    return cjk + math.ceil((len(text) - cjk) / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Prompt:
    """Everything sent to the judge apart from the record, and its version."""

    system: str
    tool: dict[str, Any]
    version: str
    model: str
    max_tokens: int
    cache_ttl: str

    @classmethod
    def build(cls, rubric: Rubric, cfg: JudgeConfig) -> Prompt:
        return cls(
            system=render_system_prompt(rubric),
            tool=tool_definition(rubric),
            version=prompt_version(rubric),
            model=cfg.model,
            max_tokens=cfg.max_tokens,
            cache_ttl=cfg.prompt_cache_ttl,
        )

    def system_blocks(self) -> list[dict[str, Any]]:
        # The breakpoint on the system prompt caches tools + system: the same for every record. "5m" is the API's
        # default, so the ttl is only sent for "1h".
        cache_control = {"type": "ephemeral"} | ({"ttl": self.cache_ttl} if self.cache_ttl != "5m" else {})
        return [{"type": "text", "text": self.system, "cache_control": cache_control}]

    def request(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The Messages API parameters for one judgment (also the ``params`` of a batch request)."""
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": self.system_blocks(),
            "tools": [self.tool],
            "tool_choice": {"type": "tool", "name": TOOL_NAME},
            "messages": messages,
        }

    @functools.cached_property
    def _prefix_tokens(self) -> int:
        return estimate_tokens(self.system + json.dumps(self.tool))

    def local_tokens(self, messages: Sequence[Mapping[str, Any]] = ()) -> int:
        """Local estimate of a call's input tokens (tools + system + these messages)."""
        contents = (m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]) for m in messages)
        return self._prefix_tokens + estimate_tokens("".join(contents))
