"""twotower_jax.data: tokenizer, corpus, tasks and the training stream."""

import re
import subprocess
import sys

import numpy as np
import pytest

from twotower_jax.data import corpus
from twotower_jax.data.stream import TrainingStream, answer_ids, eval_set, prompt_ids
from twotower_jax.data.tasks import (TASK_KINDS, Task, accuracy, draw_tasks, generate_tasks,
                                     is_heldout, score, seeded_rng)
from twotower_jax.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, ByteTokenizer

tok = ByteTokenizer()


def expected_answer(prompt: str) -> str:
    """The answer recomputed from the prompt text alone; asserts the prompt is well formed."""
    m = re.fullmatch(r"(copy|reverse|sort) ([a-z]{2,12})=", prompt)
    if m:
        kind, s = m.groups()
        return {"copy": s, "reverse": s[::-1], "sort": "".join(sorted(s))}[kind]
    m = re.fullmatch(r"add (0|[1-9][0-9]{0,3})\+(0|[1-9][0-9]{0,3})=", prompt)
    assert m, f"malformed prompt {prompt!r}"
    return str(int(m[1]) + int(m[2]))


def documents(row: np.ndarray) -> list[list[int]]:
    """The complete documents (ids between a BOS and its EOS) of one stream row."""
    assert row[0] == BOS_ID
    docs = []
    for piece in np.split(row, np.flatnonzero(row == BOS_ID))[1:]:
        assert (piece[1:] != BOS_ID).all()
        eos = np.flatnonzero(piece == EOS_ID)
        assert len(eos) <= 1 and (len(eos) == 0 or eos[0] == len(piece) - 1)
        if len(eos):
            docs.append(piece[1:-1].tolist())
    return docs


# --- tokenizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "hello", "héllo wörld — 世界 🙂", "tab\tnew\nline\x00"])
def test_tokenizer_round_trip(text):
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert all(4 <= i < 260 for i in ids[1:-1])
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids)) == text
    assert tok.encode_array(text).tolist() == tok.encode(text)


def test_tokenizer_reserved_ids():
    assert (PAD_ID, BOS_ID, EOS_ID, MASK_ID) == (0, 1, 2, 3)
    assert tok.vocab_size == 260 and tok.padded_vocab_size == 264
    assert tok.encode("A") == [ord("A") + 4]
    assert tok.encode("\x00\xff".encode("latin-1").decode("latin-1"))[0] == 4
    assert tok.encode_array("\u00ff").tolist() == [0xC3 + 4, 0xBF + 4]
    # Specials and the unused padded ids decode to nothing; plain decode does not stop at EOS.
    ab = tok.encode("ab")
    assert tok.decode([PAD_ID, ab[0], MASK_ID, 260, 263, ab[1], EOS_ID, BOS_ID] + ab) == "abab"
    assert tok.decode_until_eos(ab + [EOS_ID] + ab) == "ab"
    assert tok.decode_until_eos(ab) == "ab"


def test_tokenizer_errors():
    for bad in ([-1], [264], [4, 1000]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(bad)
    with pytest.raises(ValueError):
        tok.decode_until_eos([EOS_ID, 264])
    assert tok.decode([0xFF + 4]) == "\ufffd"  # a lone invalid UTF-8 byte is replaced, not raised


# --- corpus ------------------------------------------------------------------------------------

def test_corpus_size_and_content():
    text = corpus.load_corpus(split="all")
    size = len(text.encode("utf-8"))
    assert 200_000 < size < 5_000_000
    assert text.startswith("Module abc.")
    assert "\x01" not in text and "\x02" not in text and "\t" not in text
    assert sum(c.isascii() for c in text) / len(text) > 0.99
    cut = corpus.load_corpus(max_bytes=1001)
    assert len(cut.encode("utf-8")) <= 1001 and corpus.load_corpus().startswith(cut)


def test_corpus_deterministic_across_processes():
    here = corpus.corpus_fingerprint()
    corpus._all_documents.cache_clear()
    corpus.load_corpus.cache_clear()
    assert corpus.corpus_fingerprint() == here
    code = "from twotower_jax.data.corpus import corpus_fingerprint; print(corpus_fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_corpus_splits_disjoint():
    train, held = corpus.corpus_documents("train"), corpus.corpus_documents("heldout")
    assert train and held and len(train) + len(held) == len(corpus.MODULES)
    assert not set(train) & set(held)
    train_text = corpus.load_corpus(split="train")
    for doc in held:
        assert doc.split("\n", 1)[0] not in train_text  # the "Module x." header
    with pytest.raises(ValueError):
        corpus.corpus_documents("test")


# --- tasks -------------------------------------------------------------------------------------

def test_task_answers_correct_and_bounded():
    tasks = generate_tasks(TASK_KINDS, 4000, seed=3) + generate_tasks(TASK_KINDS, 400, 3, "heldout")
    for t in tasks:
        assert t.prompt.startswith(t.kind + " ")
        assert t.answer == expected_answer(t.prompt)
        assert len(t.prompt.encode()) <= 24 and len(t.answer.encode()) <= 15
        assert len(answer_ids(t)) <= 16
    assert {t.kind for t in tasks} == set(TASK_KINDS)
    # The generator reaches the ends of its ranges: 3 and 8 letters, 1- and 2-digit addends.
    letters = {len(t.answer) for t in tasks if t.kind != "add"}
    assert min(letters) == 3 and max(letters) == 8
    addends = [len(x) for t in tasks if t.kind == "add" for x in t.prompt[4:-1].split("+")]
    assert min(addends) == 1 and max(addends) == 2


def test_task_splits_disjoint():
    train = {t.prompt for t in generate_tasks(TASK_KINDS, 20_000, seed=0)}
    held = {t.prompt for t in generate_tasks(TASK_KINDS, 2_000, seed=0, split="heldout")}
    assert not train & held
    assert all(is_heldout(p) for p in held) and not any(is_heldout(p) for p in train)
    # The held-out bucket is about a tenth of the unfiltered distribution, not empty or everything.
    raw = draw_tasks(seeded_rng("raw"), list(TASK_KINDS) * 2500)
    assert 0.08 < np.mean([is_heldout(t.prompt) for t in raw]) < 0.12


def test_generate_tasks_deterministic():
    a = generate_tasks(["add", "sort"], 50, seed=7)
    assert a == generate_tasks(["add", "sort"], 50, seed=7)
    assert a != generate_tasks(["add", "sort"], 50, seed=8)
    assert [t.kind for t in a[:4]] == ["add", "sort", "add", "sort"]
    # A kind's instances do not depend on which other kinds are asked for.
    assert [t for t in a if t.kind == "add"] == generate_tasks(["add"], 25, seed=7)
    ev = eval_set(["copy"], 300, seed=1)
    assert len({t.prompt for t in ev}) == 300 and all(is_heldout(t.prompt) for t in ev)
    with pytest.raises(ValueError):
        generate_tasks(["multiply"], 1, seed=0)


def test_score_and_accuracy():
    t = Task("reverse", "reverse abc=", "cba")
    assert score(t, "cba") and score(t, "cba\nreverse xyz=zyx")
    for wrong in ("cb", "cbaa", " cba", "cba ", "abc", ""):
        assert not score(t, wrong)
    ids = tok.encode("cba")
    assert score(t, ids + [EOS_ID] + tok.encode("garbage"))
    assert score(t, ids + tok.encode("\nzzz") + [EOS_ID])  # a newline ends it as EOS does
    assert score(t, np.array(ids + [EOS_ID, MASK_ID, 300 % 260]))
    assert score(t, ids)
    assert not score(t, ids[:2] + [MASK_ID] + ids[2:] + [EOS_ID])  # a stray MASK is not skipped
    assert not score(t, [EOS_ID] + ids)
    assert accuracy([t, t], ["cba", "abc"]) == 0.5
    assert accuracy([t], [ids + [EOS_ID]]) == 1.0
    with pytest.raises(ValueError):
        accuracy([t], [])


# --- stream ------------------------------------------------------------------------------------

def test_stream_shape_and_documents():
    s = TrainingStream(seq_len=256, batch_size=8, seed=0, task_fraction=1.0)
    b = s.batch(0)
    assert b.shape == (8, 256) and b.dtype == np.int32
    assert b.min() >= 1 and b.max() < 260 and not (b == MASK_ID).any()
    n_docs = 0
    for row in b:
        for doc in documents(row):
            text = tok.decode(doc)
            prompt, answer = text[: text.index("=") + 1], text[text.index("=") + 1:]
            assert answer == expected_answer(prompt) and not is_heldout(prompt)
            n_docs += 1
    assert n_docs > 8 * 256 / 40


def test_stream_pure_function_of_step():
    kw = dict(seq_len=64, batch_size=4, seed=11, task_fraction=0.5)
    walked = TrainingStream(**kw)
    seq = [walked.batch(i) for i in range(6)]
    np.testing.assert_array_equal(TrainingStream(**kw).batch(5), seq[5])
    np.testing.assert_array_equal(walked.batch(2), seq[2])
    assert all((seq[i] != seq[i + 1]).any() for i in range(5))
    assert (TrainingStream(**{**kw, "seed": 12}).batch(5) != seq[5]).any()
    code = ("from twotower_jax.data.stream import TrainingStream; "
            f"print(TrainingStream(**{kw!r}).batch(5).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(seq[5].tolist())


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 1.0])
def test_stream_task_fraction(fraction):
    s = TrainingStream(seq_len=256, batch_size=16, seed=1, task_fraction=fraction)
    task_tokens = corpus_tokens = 0
    for step in range(3):
        for row in s.batch(step):
            # Every token of the row counts: a row's cut-off last document (usually a long corpus
            # chunk) is not a complete document but its tokens are in the batch.
            row_task = sum(len(doc) + 2 for doc in documents(row)
                           if re.fullmatch(r"(copy|reverse|sort|add) [a-z0-9+]+=[a-z0-9]+", tok.decode(doc)))
            task_tokens += row_task
            corpus_tokens += len(row) - row_task
    assert abs(task_tokens / (task_tokens + corpus_tokens) - fraction) < 0.1


def test_stream_never_shows_heldout_text():
    s = TrainingStream(256, 32, seed=2, task_fraction=0.0, chunk_bytes=(200, 254))
    text = tok.decode(np.concatenate([s.batch(i).ravel() for i in range(20)]))
    held_headers = [d.split("\n", 1)[0] for d in corpus.corpus_documents("heldout")]
    assert not any(h in text for h in held_headers)
    assert sum(h in text for h in ["Module " + m + "." for m in corpus.MODULES]) > 0


def test_eval_helpers():
    (t,) = eval_set(["add"], 1, seed=0)
    assert prompt_ids(t) == [BOS_ID] + tok.encode(t.prompt)
    assert answer_ids(t) == tok.encode(t.answer) + [EOS_ID]
    assert tok.decode(prompt_ids(t) + answer_ids(t)) == t.prompt + t.answer


def test_block_aligned_stream_starts_answers_on_block_boundaries():
    from twotower_jax.data import TrainingStream
    equals = ByteTokenizer().encode("=")[0]
    batch = TrainingStream(128, 4, seed=3, task_fraction=1.0, block_size=16).batch(0)
    ends = 0
    for row in batch:
        for p in np.flatnonzero(row == equals):
            assert (p + 1) % 16 == 0            # the answer starts a block
            if p + 1 == len(row):
                continue
            answer_end = p + 1 + int(np.argmax(row[p + 1:] == EOS_ID))
            if answer_end < len(row) - 16:
                block_end = (answer_end // 16 + 1) * 16
                assert np.all(row[answer_end:block_end] == EOS_ID)   # then only EOS to the block's end
                ends += 1
    assert ends > 5
    with pytest.raises(ValueError, match="block_size"):
        TrainingStream(128, 4, block_size=0)


def test_stream_answer_flags_mark_answers_and_their_filler():
    for block_size in (None, 16, 32):
        s = TrainingStream(128, 4, seed=5, task_fraction=0.7, block_size=block_size)
        tokens, answers = s.batch_with_answers(3)
        np.testing.assert_array_equal(tokens, s.batch(3))
        assert answers.dtype == bool and answers.shape == tokens.shape and answers.any()
        eq = tok.encode("=")[0]
        for row, flags in zip(tokens, answers):
            starts = np.flatnonzero(flags & ~np.concatenate([[False], flags[:-1]]))
            for start in starts:   # every flagged run starts right after a task prompt's "="
                assert start > 0 and row[start - 1] == eq
            for i in np.flatnonzero(flags):
                assert row[i] != BOS_ID
            if block_size:   # a flagged run ends on a block boundary or at the row's end
                ends = np.flatnonzero(flags & ~np.concatenate([flags[1:], [False]])) + 1
                assert all(e % block_size == 0 or e == len(row) for e in ends)


def test_corpus_ignores_what_the_process_imported_before():
    """torch replaces inspect.getfile when imported; the corpus must not change with it."""
    import inspect
    before = corpus.corpus_fingerprint()
    original = inspect.getfile
    try:
        def getfile(obj):   # a patched-in replacement, as torch installs
            return original(obj)
        getfile.__module__ = "somebody_else"
        inspect.getfile = getfile
        corpus._all_documents.cache_clear()
        corpus.load_corpus.cache_clear()
        assert corpus.corpus_fingerprint() == before
        assert "inspect.getfile:" in corpus.load_corpus(split="all")
    finally:
        inspect.getfile = original
