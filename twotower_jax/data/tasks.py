"""Procedurally generated tasks with one exact answer each, for measuring what a tiny model learned.

Format (prompt -> answer; the model reads ``[BOS] prompt`` and must write ``answer [EOS]``)::

    copy    "copy qzkw="          -> "qzkw"         the letters unchanged
    reverse "reverse qzkw="       -> "wkzq"         the letters reversed
    sort    "sort qzkw="          -> "kqwz"         the letters in alphabetical order
    add     "add 97+45="          -> "142"          decimal sum, no leading zeros

Letters are 3..8 lowercase ASCII letters (repeats allowed); addends have 1..2 digits (the digit
count uniform, then the value uniform among numbers of that many digits, so short ones are common).
Short strings and addends keep every task within reach of the miniature demo model (hidden 64, trained
minutes on a CPU; its attention has no positional encoding, so copying long strings is what it finds
hardest): each answer is a deterministic function of the prompt that a tiny model can compute exactly,
which is what lets a denoiser fill several answer positions per pass with confidence. The kind word
makes every prompt unambiguous and "=" marks where the answer starts. Prompts are at most 17 bytes and
answers at most 8, so ``answer + EOS`` fits one 16-token diffusion block (and one of 8).

Split: an instance is held out iff the CRC32 of its prompt falls in one fixed bucket of ten. The
train split never yields a held-out prompt, so train and held-out are disjoint by construction
(as sets of prompts; a prompt determines its answer).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from twotower_jax.data.tokenizer import EOS_ID, ByteTokenizer

TASK_KINDS = ("copy", "reverse", "sort", "add")
SPLITS = ("train", "heldout")
MIN_LETTERS, MAX_LETTERS = 3, 8
MAX_DIGITS = 2
MAX_PROMPT_BYTES = 24
MAX_ANSWER_BYTES = 15
HELDOUT_BUCKETS = 10

_NEWLINE_ID = ByteTokenizer().encode("\n")[0]


@dataclass(frozen=True)
class Task:
    """One instance: ``kind`` in TASK_KINDS, ``prompt`` ending in "=", the exact ``answer``."""

    kind: str
    prompt: str
    answer: str


def seeded_rng(*parts: object) -> np.random.Generator:
    """A numpy Generator that depends only on ``parts`` (hashed with BLAKE2b, not Python's salted
    ``hash``), so every process derives the same stream from the same parts."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def is_heldout(prompt: str) -> bool:
    """True for the fixed ~10% of prompts reserved for evaluation."""
    return zlib.crc32(prompt.encode()) % HELDOUT_BUCKETS == 0


def draw_tasks(rng: np.random.Generator, kinds: Sequence[str], split: str | None = None
               ) -> list[Task]:
    """One instance per entry of ``kinds`` (so its length is the count), randomness drawn in bulk
    from ``rng``. With ``split`` set, instances of the other split are dropped, so fewer may come
    back. The only place the task distribution is defined; the training stream uses it too."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    count = len(kinds)
    lengths = rng.integers(MIN_LETTERS, MAX_LETTERS + 1, count)
    letters = rng.integers(ord("a"), ord("z") + 1, (count, MAX_LETTERS), np.uint8)
    letters = letters.tobytes().decode("ascii")
    digits = rng.integers(1, MAX_DIGITS + 1, (count, 2))
    # Digit count uniform first, then the value, so that short numbers are as common as long ones.
    numbers = rng.integers(np.where(digits == 1, 0, 10 ** (digits - 1)), 10**digits).tolist()
    tasks = []
    for i, (kind, length) in enumerate(zip(kinds, lengths.tolist())):
        if kind == "add":
            a, b = numbers[i]
            prompt, answer = f"add {a}+{b}=", str(a + b)
        else:
            s = letters[i * MAX_LETTERS: i * MAX_LETTERS + length]
            if kind == "copy":
                answer = s
            elif kind == "reverse":
                answer = s[::-1]
            elif kind == "sort":
                answer = "".join(sorted(s))
            else:
                raise ValueError(f"unknown task kind {kind!r}; known: {TASK_KINDS}")
            prompt = f"{kind} {s}="
        if split is None or is_heldout(prompt) == (split == "heldout"):
            tasks.append(Task(kind, prompt, answer))
    return tasks


def generate_tasks(kinds: Sequence[str], n: int, seed: int, split: str = "train",
                   unique: bool = False) -> list[Task]:
    """``n`` instances of ``split``, kinds interleaved round-robin from ``kinds``; a pure function
    of its arguments. Each kind has its own random stream, so a kind's instances do not change
    when other kinds are added. ``unique=True`` drops repeated prompts (for evaluation sets)."""
    kinds = _checked_kinds(kinds)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    per_kind = {}
    for j, kind in enumerate(kinds):
        want = len(range(j, n, len(kinds)))
        rng = seeded_rng("generate_tasks", seed, split, kind)
        got, seen = [], set()
        while len(got) < want:
            for task in draw_tasks(rng, [kind] * 256, split):
                if unique and task.prompt in seen:
                    continue
                seen.add(task.prompt)
                got.append(task)
        per_kind[kind] = iter(got[:want])
    return [next(per_kind[kinds[i % len(kinds)]]) for i in range(n)]


def _checked_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in TASK_KINDS]
    if not kinds or unknown:
        raise ValueError(f"task kinds must be a non-empty subset of {TASK_KINDS}, got {kinds}")
    return kinds


def score(task: Task, generated: str | Sequence[int] | np.ndarray) -> bool:
    """Exact match of the generation, cut at its first EOS or newline, with ``task.answer``.

    ``generated`` is text, or token ids (the ids after the prompt). Ids are compared as ids, so a
    stray PAD/MASK before EOS is wrong rather than silently decoded away; nothing is stripped.
    """
    if isinstance(generated, str):
        return generated.split("\n", 1)[0] == task.answer
    ids = [int(i) for i in (generated.tolist() if isinstance(generated, np.ndarray) else generated)]
    for stop, i in enumerate(ids):
        if i in (EOS_ID, _NEWLINE_ID):
            ids = ids[:stop]
            break
    return ids == ByteTokenizer().encode(task.answer)


def accuracy(tasks: Sequence[Task], generations: Sequence[str | Sequence[int]]) -> float:
    """Fraction of ``tasks`` whose generation ``score``s as correct."""
    if len(tasks) != len(generations):
        raise ValueError(f"{len(tasks)} tasks but {len(generations)} generations")
    if not tasks:
        raise ValueError("accuracy of no tasks is undefined")
    return sum(score(t, g) for t, g in zip(tasks, generations)) / len(tasks)
