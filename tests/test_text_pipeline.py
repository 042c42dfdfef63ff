"""The grain text pipeline: packing (documents separated by EOS, no token lost), exact resume of the
iterator from its saved state (also through `TextBatches`, the training loop's batch_fn, whose position
`loop.train` keeps inside the orbax checkpoint step), per-host shards
disjoint and covering, the JSONL / Parquet / ArrayRecord sources agreeing, and the local tokenizer CLI.
A small BPE tokenizer is trained here with `tokenizers`; nothing is downloaded."""
import json
import random

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("tokenizers")

from twotower_jax.data import text_pipeline as tp  # noqa: E402

WORDS = ("alpha beta gamma delta tower diffusion block mask token state mamba expert router "
         "context denoiser cache scan chunk").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(41)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    assert tp.text_to_jsonl(root / "corpus.txt", root / "corpus.jsonl") == len(docs)
    tp.train_tokenizer([root / "corpus.txt"], 300, root / "tokenizer.json")
    return root, docs


def pipeline(corpus, **overrides):
    root, _ = corpus
    settings = dict(data=(str(root / "corpus.jsonl"),), tokenizer=str(root / "tokenizer.json"), seq_len=16,
                    batch_size=2, num_epochs=1, shard_index=0, shard_count=1, seed=5)
    settings.update(overrides)
    return tp.TextPipeline(tp.TextPipelineConfig(**settings))


def test_local_tokenizer_has_the_byte_tokenizers_special_ids(corpus):
    root, docs = corpus
    tok = tp.load_tokenizer(root)   # a directory holding tokenizer.json
    assert [tok.token_to_id(s) for s in tp.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode(docs[3]).ids) == docs[3]


@pytest.mark.parametrize("shuffle", [False, True])
def test_packed_sequences_are_the_eos_separated_stream(corpus, shuffle):
    _, docs = corpus
    p = pipeline(corpus, shuffle=shuffle, num_epochs=2)
    assert p.eos_id == 2
    order = p.documents()
    assert sorted(order) == sorted(list(range(len(docs))) * 2)
    assert (order[:len(docs)] != list(range(len(docs)))) == shuffle
    if shuffle:   # each epoch its own order
        assert order[:len(docs)] != order[len(docs):]
    stream = np.concatenate([p.encode(docs[i]) for i in order])
    for i in order[:5]:   # each document's tokens, then EOS
        ids = p.tokenizer.encode(docs[i], add_special_tokens=False).ids
        assert p.encode(docs[i]).tolist() == ids + [2]
    batches = list(p.iterator())
    assert all(b.shape == (2, 16) and b.dtype == np.int32 for b in batches)
    packed = np.concatenate([b.reshape(-1) for b in batches])
    # no token lost: everything up to the last full batch, in order, no padding
    assert len(packed) == len(stream) // 32 * 32 and len(stream) - len(packed) < 32
    np.testing.assert_array_equal(packed, stream[:len(packed)])


def test_bos_and_named_special_tokens(corpus):
    _, docs = corpus
    p = pipeline(corpus, add_bos=True, eos_token="</s>")
    assert p.bos_id == 1 and p.eos_id == 2
    encoded = p.encode(docs[0])
    assert encoded[0] == 1 and encoded[-1] == 2 and 1 not in encoded[1:-1].tolist()
    with pytest.raises(ValueError, match="no EOS token"):
        pipeline(corpus, eos_token="<|nope|>")


def test_iterator_resumes_exactly_from_saved_state(corpus):
    p = pipeline(corpus, num_epochs=None)   # forever: crosses epoch boundaries
    it = p.iterator()
    reference = [next(it) for _ in range(60)]   # ~3 epochs of this corpus
    for k in (0, 1, 7, 25, 41):
        it = p.iterator()
        for _ in range(k):
            next(it)
        saved = json.dumps(it.get_state())       # what a checkpoint would hold
        resumed = pipeline(corpus, num_epochs=None).iterator(json.loads(saved))
        for j in range(k, min(k + 12, 60)):
            np.testing.assert_array_equal(next(resumed), reference[j], err_msg=f"resumed at {k}, batch {j}")


def test_text_batches_resume_from_their_data_state(corpus):
    uninterrupted = tp.TextBatches(pipeline(corpus, num_epochs=None))
    reference = [uninterrupted(i) for i in range(20)]
    assert uninterrupted.process_local and uninterrupted.batches_read == 20
    # a run that read batches 0..7, its position saved as JSON (what loop.train puts in the checkpoint)
    first = tp.TextBatches(pipeline(corpus, num_epochs=None))
    for i in range(8):
        np.testing.assert_array_equal(first(i), reference[i])
    saved = json.loads(json.dumps(first.data_state()))
    assert saved["next_batch"] == 8 and saved["pipeline"]["shard_count"] == 1
    second = tp.TextBatches(pipeline(corpus, num_epochs=None))
    second.restore_data_state(saved)
    for i in range(8, 20):
        np.testing.assert_array_equal(second(i), reference[i], err_msg=f"batch {i}")
    assert second.batches_read == 12             # read on from the saved position, nothing before it
    np.testing.assert_array_equal(second(16), reference[16])   # an earlier batch: from the start
    np.testing.assert_array_equal(second(2), reference[2])
    # a position saved by another pipeline (here: another seed / row length) is refused, as is junk
    for other in (dict(seed=6), dict(seq_len=8)):
        with pytest.raises(ValueError, match="another pipeline"):
            tp.TextBatches(pipeline(corpus, num_epochs=None, **other)).restore_data_state(saved)
    with pytest.raises(ValueError, match="not a TextBatches data state"):
        second.restore_data_state({"iterator": {}})


def _train_on_text(corpus, workdir, steps=8, stop_after=None, batch_fn=None):
    """A tiny AR tower trained by loop.train on the text pipeline (or on `batch_fn(feed)`);
    (final params, feed, logged losses)."""
    import dataclasses
    import functools

    import jax

    from twotower_jax.config import tiny
    from twotower_jax.tower import Impl, NemotronH
    from twotower_jax.training.loop import TrainConfig, read_metrics, train
    from twotower_jax.training.objective import ar_loss

    feed = tp.TextBatches(pipeline(corpus, num_epochs=None))
    model = NemotronH(dataclasses.replace(tiny(pattern="M*"), vocab_size=feed.pipeline.vocab_size),
                      impl=Impl(moe="dense"))
    cfg = TrainConfig(steps=steps, peak_lr=3e-3, warmup_steps=2, save_every=3, log_every=1)
    final = train(functools.partial(ar_loss, model=model), model.random_params(seed=0, scale=0.3), None,
                  feed if batch_fn is None else batch_fn(feed), cfg, workdir, stop_after=stop_after, progress=False)
    return jax.device_get(final), feed, [r["loss"] for r in read_metrics(workdir)]


def test_training_resumes_the_text_stream_from_the_checkpoint(corpus, tmp_path):
    """loop.train on TextBatches, stopped after step 5 (checkpoints after 3 and 5) and resumed by a new
    run with a fresh feed == uninterrupted: the data position is an item of the checkpoint step itself
    (one per process), and the resumed feed reads only batches 5, 6, 7."""
    import jax

    whole, _, whole_losses = _train_on_text(corpus, tmp_path / "whole")
    _, stopped, _ = _train_on_text(corpus, tmp_path / "split", stop_after=5)
    assert stopped.batches_read == 5
    step_dir = tmp_path / "split" / "checkpoints" / "5"
    assert sorted(p.name for p in step_dir.iterdir() if not p.name.startswith("_")
                  and p.is_dir()) == ["data", "state"]
    item = json.loads((step_dir / "data" / "metadata").read_text())
    assert item["process_count"] == 1 and item["processes"]["0"][0]["next_batch"] == 5
    final, resumed, losses = _train_on_text(corpus, tmp_path / "split")
    assert resumed.batches_read == 3
    assert not list(tmp_path.rglob("data_state*"))   # nothing beside the checkpoints
    assert len(losses) == len(whole_losses) == 8
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_checkpoints_without_a_data_position_are_refused_for_a_text_run(corpus, tmp_path):
    """A checkpoint step with no `data` item (written by a run on a pure batch_fn, or before data state
    moved into the checkpoint: the old single-item layout) resumes a pure batch_fn but not a data feed;
    a data item from another process count is refused too."""
    import orbax.checkpoint as ocp

    from twotower_jax.training import loop

    _train_on_text(corpus, tmp_path / "text", stop_after=3)
    # the old layout: one unnamed item with params and opt_state
    legacy = tmp_path / "legacy" / loop.CHECKPOINTS_DIR
    with ocp.CheckpointManager(legacy.absolute(), options=ocp.CheckpointManagerOptions(create=True)) as manager:
        old = ocp.CheckpointManager((tmp_path / "text" / loop.CHECKPOINTS_DIR).absolute(),
                                    item_handlers={loop.STATE_ITEM: ocp.StandardCheckpointHandler()})
        state = old.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        old.close()
        manager.save(3, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    with pytest.raises(ValueError, match="holds no data position"):
        _train_on_text(corpus, tmp_path / "legacy")

    def fixed(feed):   # a pure batch_fn (no data state): the legacy step resumes and steps 4, 5 are trained
        rows = [feed(i) for i in range(5)]
        return lambda index: rows[index]

    _train_on_text(corpus, tmp_path / "legacy", steps=5, batch_fn=fixed)
    assert [r["step"] for r in loop.read_metrics(tmp_path / "legacy")] == [4, 5]

    feed = tp.TextBatches(pipeline(corpus, num_epochs=None))
    with pytest.raises(ValueError, match="written by 2 processes"):
        loop._restore_feeds([feed], {"format": loop.DATA_FORMAT, "process_count": 2, "processes": {}}, 7)
    with pytest.raises(ValueError, match="unknown data item format"):
        loop._restore_feeds([feed], {"format": "x"}, 7)


@pytest.mark.parametrize("count", [2, 3])
def test_per_host_shards_are_disjoint_and_covering(corpus, count):
    _, docs = corpus
    shards = [pipeline(corpus, shard_index=i, shard_count=count) for i in range(count)]
    seen = [set(s.documents()) for s in shards]
    for i in range(count):
        for j in range(i + 1, count):
            assert not seen[i] & seen[j]
    assert set().union(*seen) == set(range(len(docs)))
    assert all(len(s.documents()) == len(d) for s, d in zip(shards, seen))   # each document once per epoch
    # the batches differ between hosts, and each host's are its own documents' tokens
    first = [next(s.iterator()) for s in shards]
    assert not np.array_equal(first[0], first[1])
    with pytest.raises(ValueError, match="shard_index"):
        pipeline(corpus, shard_index=count, shard_count=count)


def test_parquet_and_array_record_sources_match_jsonl(corpus, tmp_path):
    _, docs = corpus
    jsonl = pipeline(corpus)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    table = pa.table({"text": docs, "id": list(range(len(docs)))})
    pq.write_table(table.slice(0, 20), tmp_path / "a.parquet", row_group_size=6)
    pq.write_table(table.slice(20), tmp_path / "b.parquet", row_group_size=7)
    assert tp.write_array_record(docs, tmp_path / "docs.array_record") == len(docs)
    for files in ([tmp_path / "a.parquet", tmp_path / "b.parquet"], [tmp_path / "docs.array_record"]):
        source = tp.open_source(files)
        assert len(source) == len(docs) and [source[i] for i in (0, 19, 20, 40, 5)] == [docs[i] for i in (0, 19, 20, 40, 5)]
        other = pipeline(corpus, data=tuple(map(str, files)))
        for a, b in zip(jsonl.iterator(), other.iterator()):
            np.testing.assert_array_equal(a, b)
    (tmp_path / "corpus.txt").write_text("plain text")
    with pytest.raises(ValueError, match="unknown data format"):
        tp.open_source([tmp_path / "corpus.txt"])


def test_cli_trains_a_tokenizer_and_peeks(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "tok" / "tokenizer.json"
    assert tp.main(["train-tokenizer", "--input", str(root / "corpus.txt"), "--vocab-size", "280",
                    "--out", str(out)]) == 0
    assert "vocab 280" in capsys.readouterr().out and out.is_file()
    assert tp.main(["peek", "--data", str(root / "corpus.jsonl"), "--tokenizer", str(out), "--seq-len", "12"]) == 0
    printed = capsys.readouterr().out
    assert "JsonlSource(41 documents" in printed and "batch 0 row 1 (12 tokens)" in printed


def test_two_processes_on_their_own_shards_equal_one_process_with_the_global_batch(corpus, tmp_path):
    """2 processes (1 CPU device each, jax.distributed), each reading its own shard of the text through
    `TextBatches` and feeding only its rows (loop.train builds the global batch: shard 0's rows, then
    shard 1's), stopped after step 4 and resumed by two new processes from the checkpoint's per-process
    data positions == 1 process with 2 devices building the same global batches itself, uninterrupted:
    losses of all 8 steps and final params within 1e-5 (tests/text_train_worker.py)."""
    import os
    import socket
    import subprocess
    import sys

    from xla_test_flags import training_subprocess_env

    root, _ = corpus
    worker = os.path.join(os.path.dirname(__file__), "text_train_worker.py")

    def launch(layout, out, workdir, devices, **flags):
        argv = [sys.executable, worker, "--layout", layout, "--data", str(root / "corpus.jsonl"),
                "--tokenizer", str(root / "tokenizer.json"), "--workdir", str(workdir), "--out", str(out)]
        for key, value in flags.items():
            argv += [f"--{key}", str(value)]
        return subprocess.Popen(argv, env=training_subprocess_env(devices))

    def two_processes(out, **flags):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
        return [launch("processes", out, tmp_path / "two", 1, coordinator_address=address, num_processes=2,
                       process_id=pid, **flags) for pid in range(2)]

    reference = launch("reference", tmp_path / "reference.json", tmp_path / "one", 2)
    first = two_processes(tmp_path / "first.json", stop_after=4)
    assert [p.wait(timeout=600) for p in first] == [0, 0]
    item = json.loads((tmp_path / "two" / "checkpoints" / "4" / "data" / "metadata").read_text())
    assert item["process_count"] == 2
    assert [item["processes"][str(i)][0]["pipeline"]["shard_index"] for i in range(2)] == [0, 1]
    assert [item["processes"][str(i)][0]["next_batch"] for i in range(2)] == [4, 4]
    second = two_processes(tmp_path / "second.json")
    assert [p.wait(timeout=600) for p in second] == [0, 0]
    assert reference.wait(timeout=600) == 0
    one = json.loads((tmp_path / "reference.json").read_text())
    two = json.loads((tmp_path / "second.json").read_text())
    assert json.loads((tmp_path / "first.json").read_text())["batches_read"] == [4, 4]
    assert two["batches_read"] == [4, 4]       # batches 4..7 only: each read on from its saved position
    assert two["global_rows_from"] == [0, 0, 1, 1]   # the global batch: process 0's rows, then process 1's
    assert len(two["losses"]) == len(one["losses"]) == 8
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    assert two["params"].keys() == one["params"].keys()
    for name in one["params"]:
        np.testing.assert_allclose(two["params"][name], one["params"][name], rtol=1e-5, atol=1e-5, err_msg=name)
