"""Data that exists on every machine, for training tiny models on a CPU: a byte tokenizer, a
stdlib-docstring corpus, exactly scored procedural tasks, and a resumable training stream.
Pure numpy and the standard library; nothing is downloaded."""

from twotower_jax.data.corpus import corpus_documents, corpus_fingerprint, load_corpus
from twotower_jax.data.stream import TrainingStream, answer_ids, eval_set, prompt_ids
from twotower_jax.data.tasks import TASK_KINDS, Task, accuracy, generate_tasks, score
from twotower_jax.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, PADDED_VOCAB_SIZE, ByteTokenizer

__all__ = [
    "BOS_ID", "EOS_ID", "MASK_ID", "PAD_ID", "PADDED_VOCAB_SIZE", "TASK_KINDS", "ByteTokenizer", "Task", "TrainingStream",
    "accuracy", "answer_ids", "corpus_documents", "corpus_fingerprint", "eval_set",
    "generate_tasks", "load_corpus", "prompt_ids", "score",
]
