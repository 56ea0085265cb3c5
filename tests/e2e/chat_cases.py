"""Conversations written once as segments, then sent as text or with embeddings.

A segment is ("t", text) for a text part or ("e", text) for a prompt_embeds part holding the
model's own embedding rows of that text. Sent all as text, a case is the reference; sent with
embeddings, greedy output must be identical. Part boundaries sit before a space or at the end
of a message, where byte-level BPE never merges across, so the token rows are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Segment = tuple[str, str]
Case = list[dict[str, Any]]  # messages whose "content" is a list of segments (or a string)

CASES: dict[str, Case] = {
    "one_part": [
        {"role": "user", "content": [("t", "def hello(world):"), ("e", " return world + 1")]},
    ],
    "only_embeds": [
        {"role": "user", "content": [("e", "import os, sys")]},
    ],
    "several_parts": [
        {"role": "user", "content": [("e", "import os"), ("t", " and"), ("e", " import sys")]},
    ],
    "interleaved": [
        {
            "role": "user",
            "content": [("t", "class Foo:"), ("e", " def bar(self):"), ("t", " return self")],
        },
    ],
    "adjacent_parts": [
        {"role": "user", "content": [("e", "for item"), ("e", " in range(10):")]},
    ],
    "every_role": [
        {"role": "system", "content": [("e", "You write Python.")]},
        {"role": "user", "content": [("t", "Write"), ("e", " a loop")]},
        {"role": "assistant", "content": [("e", "for i in range(3):")]},
        {"role": "user", "content": [("t", "Now a"), ("e", " function")]},
    ],
    "tool_role": [
        {"role": "user", "content": "Call the tool"},
        {"role": "assistant", "content": [("t", "calling")]},
        {"role": "tool", "content": [("e", "result = 42")], "tool_call_id": "call_1"},
    ],
    "multi_turn": [
        {"role": "user", "content": [("e", "What is a list?")]},
        {"role": "assistant", "content": "A list holds items."},
        {"role": "user", "content": [("t", "And a"), ("e", " dict?")]},
        {"role": "assistant", "content": [("e", "A dict maps keys")]},
        {"role": "user", "content": "Thanks"},
    ],
}


# Request chat templates for the tiny model (ChatML-like) that reorder, repeat or drop
# content, or take string content only.
_BODY = (
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
)
_TURN = "{{- '<|im_start|>' + message['role'] + '\\n' }}" + _BODY + "{{- '<|im_end|>\\n' }}"
_GEN = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"

REVERSED = "{%- for message in messages | reverse %}" + _TURN + "{%- endfor %}" + _GEN
REPEATED = "{%- for message in messages %}" + _TURN + _TURN + "{%- endfor %}" + _GEN
LAST_ONLY = "{%- set message = messages[-1] %}" + _TURN + _GEN
STRING_CONTENT = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{{- message['content'] }}{{- '<|im_end|>\\n' }}{%- endfor %}" + _GEN
)


def render(
    case: Case, part_for_embeds, others: Mapping[str, Callable[[str], dict]] | None = None
) -> list[dict[str, Any]]:
    """Turn a case into messages; ``part_for_embeds(text)`` builds each ("e", text) part, and
    ``others[kind](value)`` each segment of another kind (e.g. images)."""
    builders = {"t": lambda text: {"type": "text", "text": text}, **(others or {})}
    messages = []
    for message in case:
        content = message["content"]
        if isinstance(content, list):
            content = [
                builders[kind](value) if kind in builders else part_for_embeds(value)
                for kind, value in content
            ]
        messages.append({**message, "content": content})
    return messages


def as_text(
    case: Case, others: Mapping[str, Callable[[str], dict]] | None = None
) -> list[dict[str, Any]]:
    return render(case, lambda text: {"type": "text", "text": text}, others)
