"""A small sentiment task generated locally: one-sentence reviews, answered in one fixed form.

The expected answer is exactly ``Sentiment: positive`` or ``Sentiment: negative``; an instruct
model without the soft prompt answers in its own words, so it scores (near) zero in that form.
Training and held-out reviews never share a (subject, phrase) pair.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

SUBJECTS = [
    "The pasta", "This phone", "The hotel room", "The concert", "This laptop", "The movie",
    "The coffee", "This jacket", "The service", "The museum tour", "This novel", "The train ride",
    "The headphones", "The pizza", "This game", "The museum cafe", "The dentist visit",
    "The new album", "This blender", "The taxi driver",
]  # fmt: skip
POSITIVE = [
    "was absolutely wonderful", "exceeded every expectation", "made my whole week",
    "was a real delight", "worked perfectly from day one", "was worth every penny",
    "left me smiling for hours", "felt warm and welcoming", "is the best I have tried",
    "was fantastic in every way",
]  # fmt: skip
NEGATIVE = [
    "was a complete waste of money", "broke after two days", "left me deeply disappointed",
    "was cold and unfriendly", "was the worst I have tried", "fell apart almost at once",
    "made me regret coming", "was painfully slow and dull", "was rude from start to finish",
    "did not work at all",
]  # fmt: skip
INSTRUCTION = "Classify the sentiment of the review. Answer with Sentiment: positive or negative."


@dataclass(frozen=True)
class Review:
    text: str
    label: str  # "positive" or "negative"

    @property
    def answer(self) -> str:
        return f"Sentiment: {self.label}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Review: {self.text}"}]


def reviews(seed: int = 0) -> tuple[list[Review], list[Review]]:
    """(train, held_out): 160 and 40 reviews, balanced, disjoint in (subject, phrase)."""
    rng = random.Random(seed)
    pairs = [
        Review(f"{subject} {phrase}.", label)
        for label, phrases in (("positive", POSITIVE), ("negative", NEGATIVE))
        for subject, phrase in itertools.product(SUBJECTS, phrases)
    ]
    rng.shuffle(pairs)
    pos = [r for r in pairs if r.label == "positive"]
    neg = [r for r in pairs if r.label == "negative"]
    train = pos[:80] + neg[:80]
    held_out = pos[80:100] + neg[80:100]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out
