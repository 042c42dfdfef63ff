"""Training batches as a pure function of (seed, step), so a run resumes exactly where it stopped.

Each row of a batch is filled with documents back to back and cut at ``seq_len`` (the last
document of a row loses its tail; nothing is padded):

    task document:    [BOS] prompt answer [EOS]      e.g. [BOS] "reverse abc=cba" [EOS]
    corpus document:  [BOS] chunk [EOS]              chunk = a random slice of the train corpus

With ``block_size`` S, task documents are laid out the way block diffusion generates them: EOS
filler before ``[BOS] prompt`` so that the answer starts on a multiple of S, and EOS filler after
``answer [EOS]`` up to the next multiple of S. The denoiser then trains on exactly what it meets at
inference (the first block after a prompt holds the answer and then nothing but EOS).

Which kind comes next is decided by a running token count over the batch: a task whenever the
task tokens so far are below ``task_fraction`` of all tokens so far. So ``task_fraction`` is the
share of task tokens per batch (up to one document), 1.0 gives tasks only, 0.0 corpus only.
Only the train splits of the tasks and of the corpus are ever used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twotower_jax.data.corpus import load_corpus
from twotower_jax.data.tasks import (TASK_KINDS, Task, _checked_kinds, draw_tasks, generate_tasks,
                                     seeded_rng)
from twotower_jax.data.tokenizer import BOS_ID, EOS_ID, NUM_SPECIAL, ByteTokenizer

# Rows are assembled as raw bytes with 0x01 / 0x02 standing for BOS / EOS (neither occurs in the
# tasks or, by construction, in the corpus), then mapped to ids with one table lookup.
_BOS_BYTE, _EOS_BYTE = b"\x01", b"\x02"
_BYTE_TO_ID = np.arange(256, dtype=np.int32) + NUM_SPECIAL
_BYTE_TO_ID[_BOS_BYTE[0]] = BOS_ID
_BYTE_TO_ID[_EOS_BYTE[0]] = EOS_ID
_DRAW = 128  # tasks / corpus chunks drawn from the rng at a time


class TrainingStream:
    """``batch(step)`` -> int32 ``(batch_size, seq_len)``, depending only on the constructor's
    arguments and ``step``.

    Args:
      seq_len, batch_size: batch shape.
      seed: selects the stream; equal seeds give equal batches in every process.
      task_kinds: kinds drawn uniformly for task documents.
      task_fraction: share of task tokens in each batch, in [0, 1].
      corpus_max_bytes: use only this prefix of the train corpus (None: all of it).
      chunk_bytes: (min, max) length of a corpus chunk; max defaults to ``seq_len - 2`` so a whole
        document fits one row.
      block_size: if given, align task answers to blocks of this size (see the module docstring).
    """

    def __init__(self, seq_len: int, batch_size: int, seed: int = 0,
                 task_kinds: Sequence[str] = TASK_KINDS, task_fraction: float = 1.0,
                 corpus_max_bytes: int | None = None,
                 chunk_bytes: tuple[int, int | None] = (16, None), block_size: int | None = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len, batch_size must be positive, got {seq_len}, {batch_size}")
        if not 0.0 <= task_fraction <= 1.0:
            raise ValueError(f"task_fraction must lie in [0, 1], got {task_fraction}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.task_kinds = _checked_kinds(task_kinds)
        self.task_fraction = float(task_fraction)
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        lo, hi = chunk_bytes
        self.chunk_bytes = (lo, max(lo, seq_len - 2) if hi is None else hi)
        if not 1 <= self.chunk_bytes[0] <= self.chunk_bytes[1]:
            raise ValueError(f"chunk_bytes must satisfy 1 <= min <= max, got {self.chunk_bytes}")
        self._corpus = b""
        if self.task_fraction < 1.0:
            self._corpus = load_corpus(corpus_max_bytes, split="train").encode("utf-8")
            if _BOS_BYTE in self._corpus or _EOS_BYTE in self._corpus:
                raise ValueError("corpus contains the 0x01/0x02 sentinel bytes")
            if len(self._corpus) < self.chunk_bytes[1]:
                raise ValueError(f"corpus ({len(self._corpus)} bytes) is shorter than a chunk")

    def _task_docs(self, rng: np.random.Generator) -> list[tuple[bytes, bytes]]:
        """(``[BOS] prompt``, ``answer [EOS]``) pairs."""
        kinds = [self.task_kinds[k] for k in rng.integers(0, len(self.task_kinds), _DRAW).tolist()]
        return [(_BOS_BYTE + t.prompt.encode(), t.answer.encode() + _EOS_BYTE)
                for t in draw_tasks(rng, kinds, "train")]

    def _lay_out(self, row_length: int, prompt: bytes, answer: bytes) -> tuple[bytes, bytes]:
        """The document's bytes and its answer flags (1 on the answer and the filler after it)."""
        if self.block_size is None:
            return prompt + answer, b"\x00" * len(prompt) + b"\x01" * len(answer)
        before = -(row_length + len(prompt)) % self.block_size
        after = -len(answer) % self.block_size
        return (_EOS_BYTE * before + prompt + answer + _EOS_BYTE * after,
                b"\x00" * (before + len(prompt)) + b"\x01" * (len(answer) + after))

    def _corpus_docs(self, rng: np.random.Generator) -> list[bytes]:
        lengths = rng.integers(self.chunk_bytes[0], self.chunk_bytes[1] + 1, _DRAW)
        starts = (rng.random(_DRAW) * (len(self._corpus) - lengths + 1)).astype(np.int64)
        return [_BOS_BYTE + self._corpus[s:s + n] + _EOS_BYTE
                for s, n in zip(starts.tolist(), lengths.tolist())]

    def _rows(self, step: int) -> tuple[bytes, bytes]:
        """(row bytes, answer flags) of the whole batch: one flag byte per token, 1 on a task's
        ``answer [EOS]`` and on the EOS filler after it, 0 elsewhere."""
        rng = seeded_rng("TrainingStream", self.seed, int(step))
        tasks: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        task_tokens = corpus_tokens = 0
        rows, flags = [], []
        for _ in range(self.batch_size):
            row, flag = b"", b""
            while len(row) < self.seq_len:
                is_task = task_tokens < self.task_fraction * (task_tokens + corpus_tokens + 1)
                queue = tasks if is_task else chunks
                if not queue:
                    queue.extend(self._task_docs(rng) if is_task else self._corpus_docs(rng))
                doc = queue.pop()
                if is_task:
                    doc, doc_flag = self._lay_out(len(row), *doc)
                else:
                    doc_flag = b"\x00" * len(doc)
                room = self.seq_len - len(row)
                doc, doc_flag = doc[:room], doc_flag[:room]
                row += doc
                flag += doc_flag
                if is_task:
                    task_tokens += len(doc)
                else:
                    corpus_tokens += len(doc)
            rows.append(row)
            flags.append(flag)
        return b"".join(rows), b"".join(flags)

    def batch(self, step: int) -> np.ndarray:
        """The batch for ``step``: int32 ``(batch_size, seq_len)``."""
        raw = np.frombuffer(self._rows(step)[0], np.uint8)
        return _BYTE_TO_ID[raw].reshape(self.batch_size, self.seq_len)

    def batch_with_answers(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(batch(step), answers)``: ``answers`` is bool ``(batch_size, seq_len)``, True on the tokens
        a task's answer occupies (``answer [EOS]`` and, with ``block_size``, the EOS filler up to the
        block's end: what the sampler generates). For loss variants restricted to answers."""
        raw, flags = self._rows(step)
        tokens = _BYTE_TO_ID[np.frombuffer(raw, np.uint8)].reshape(self.batch_size, self.seq_len)
        return tokens, np.frombuffer(flags, np.uint8).reshape(self.batch_size, self.seq_len).astype(bool)


def prompt_ids(task: Task) -> list[int]:
    """What the model reads at evaluation: ``[BOS] + prompt``; it must then write answer + EOS."""
    return ByteTokenizer().encode(task.prompt, bos=True)


def answer_ids(task: Task) -> list[int]:
    """The ids the model should generate after ``prompt_ids(task)``: answer + EOS."""
    return ByteTokenizer().encode(task.answer, eos=True)


def eval_set(kinds: Sequence[str], n: int, seed: int = 0) -> list[Task]:
    """``n`` distinct held-out tasks (never seen by any ``TrainingStream``), kinds round-robin."""
    return generate_tasks(kinds, n, seed, split="heldout", unique=True)
