"""Real text for training: a grain pipeline over local JSONL / Parquet / ArrayRecord files, tokenized with
a Hugging Face `tokenizers` tokenizer (the release's `tokenizer.json`, or one trained here with
`train_tokenizer`), documents packed back to back into sequences of L = N·S tokens.

    documents (random access over all files, in file order)
      -> this host's shard: documents shard_index, shard_index + shard_count, ...   (disjoint, covering)
      -> shuffled per epoch (seeded; a new order every epoch), repeated `num_epochs` times (None: forever)
      -> tokenized: [BOS] + ids + [EOS]                                                 (BOS optional)
      -> packed: the token stream doc0 EOS doc1 EOS ... cut into rows of `seq_len` (no padding, nothing
         dropped; a document that does not fit continues at the start of the next row)
      -> batched: (batch_size, seq_len) int32 per host; the last partial batch of a finite run is dropped

Exact resume: the iterator's state (`get_state()`, a small JSON-serialisable dict: the grain parent
iterator's position before the document being packed and the offset into it) restored with
`set_state()` continues with exactly the batches an uninterrupted iterator would give. `TextBatches`
adapts a pipeline to the training loop's `batch_fn(step)` contract as a `loop.DataFeed`: the loop saves
that state inside each orbax checkpoint step (one per process), so a resumed run reads the same batches.

The byte-level demo data (`twotower_jax.data.TrainingStream`) stays the offline default; this module needs
`grain` and `tokenizers` (the `text` extra; `pyarrow` for Parquet, `array_record` comes with grain).

Command line (a tokenizer from a local text file, a JSONL file from it, and a look at the packed rows):

    python -m twotower_jax.data.text_pipeline train-tokenizer --input corpus.txt --vocab-size 4096 --out tok.json
    python -m twotower_jax.data.text_pipeline to-jsonl --input corpus.txt --out corpus.jsonl
    python -m twotower_jax.data.text_pipeline peek --data corpus.jsonl --tokenizer tok.json --seq-len 128
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

# Special tokens of a locally trained tokenizer, in id order: the byte tokenizer's reserved ids
# (PAD 0, BOS 1, EOS 2, MASK 3 = the release's mask_token_id), so the samplers' defaults apply unchanged.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")
EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|im_end|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


# ---------------------------------------------------------------------------------------------- sources

def _as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("no data files given")
    for p in out:
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
    return out


class JsonlSource:
    """Random access to the `field` of every line of one or more JSON-lines files (blank lines skipped).
    Building the line index reads each file once; records are read from disk on access."""

    def __init__(self, paths, field: str = "text"):
        self.paths = _as_paths(paths)
        self.field = field
        file_ids, offsets, lengths = [], [], []
        for i, path in enumerate(self.paths):
            position = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        file_ids.append(i)
                        offsets.append(position)
                        lengths.append(len(line))
                    position += len(line)
        self._file = np.asarray(file_ids, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._length = np.asarray(lengths, np.int64)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> str:
        i = int(self._file[index])
        fd = self._fds.get(i)
        if fd is None:
            with self._lock:
                fd = self._fds.get(i)
                if fd is None:
                    fd = self._fds[i] = os.open(self.paths[i], os.O_RDONLY)
        # pread: no shared file position, so grain's prefetch threads may read concurrently
        record = json.loads(os.pread(fd, int(self._length[index]), int(self._offset[index])))
        if self.field not in record:
            raise KeyError(f"{self.paths[i]}: a record has no field {self.field!r} (has {sorted(record)})")
        return record[self.field]

    def __getstate__(self):   # picklable for grain worker processes: reopen files there
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _fds={}, _lock=threading.Lock())

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"JsonlSource({len(self)} documents in {len(self.paths)} file(s), field {self.field!r})"


class ParquetSource:
    """Random access to the string column `field` of one or more Parquet files (pyarrow), read a row group
    at a time with a small cache of recent row groups: cheap in file order, a row-group read per document
    under a global shuffle (shuffle=False, or pre-shuffled files, for very large Parquet corpora)."""

    def __init__(self, paths, field: str = "text", cache_row_groups: int = 8):
        import pyarrow.parquet as pq
        self.paths = _as_paths(paths)
        self.field = field
        self.cache_row_groups = cache_row_groups
        starts, groups = [], []
        total = 0
        for i, path in enumerate(self.paths):
            meta = pq.ParquetFile(path).metadata
            if field not in meta.schema.names:
                raise KeyError(f"{path}: no column {field!r} (has {meta.schema.names})")
            for g in range(meta.num_row_groups):
                starts.append(total)
                groups.append((i, g))
                total += meta.row_group(g).num_rows
        self._starts = np.asarray(starts, np.int64)
        self._groups = groups
        self._length = total
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> str:
        import pyarrow.parquet as pq
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(index)
        g = int(np.searchsorted(self._starts, index, side="right")) - 1
        with self._lock:   # grain's prefetch threads share the cache
            column = self._cache.get(g)
            if column is not None:
                self._cache.move_to_end(g)
        if column is None:
            file_index, group = self._groups[g]
            table = pq.ParquetFile(self.paths[file_index]).read_row_group(group, columns=[self.field])
            column = table.column(self.field).to_pylist()
            with self._lock:
                self._cache[g] = column
                while len(self._cache) > self.cache_row_groups:
                    self._cache.popitem(last=False)
        return column[index - int(self._starts[g])]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _cache=collections.OrderedDict(), _lock=threading.Lock())

    def __repr__(self) -> str:
        return f"ParquetSource({len(self)} documents in {len(self.paths)} file(s), column {self.field!r})"


class ArrayRecordSource:
    """Random access to ArrayRecord files (grain's `ArrayRecordDataSource`) whose records are UTF-8 text
    (what `write_array_record` writes), one document per record."""

    def __init__(self, paths):
        import grain
        self.paths = _as_paths(paths)
        self._source = grain.sources.ArrayRecordDataSource([str(p) for p in self.paths])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        return self._source[int(index)].decode("utf-8")

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self)} documents in {len(self.paths)} file(s))"


def write_array_record(texts: Iterable[str], path: str | os.PathLike) -> int:
    """Writes one UTF-8 record per text (group size 1: cheap random access); returns the record count."""
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(path), "group_size:1")
    n = 0
    for text in texts:
        writer.write(text.encode("utf-8"))
        n += 1
    writer.close()
    return n


def open_source(paths, field: str = "text"):
    """The source for `paths` by extension: .jsonl/.json/.ndjson, .parquet, .array_record/.arrayrecord."""
    paths = _as_paths(paths)
    kinds = {_kind(p) for p in paths}
    if len(kinds) != 1:
        raise ValueError(f"data files of one kind at a time, got {sorted(kinds)}")
    kind = kinds.pop()
    if kind == "jsonl":
        return JsonlSource(paths, field)
    if kind == "parquet":
        return ParquetSource(paths, field)
    return ArrayRecordSource(paths)


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".array_record", ".arrayrecord")) or ".array_record-" in name:
        return "array_record"
    raise ValueError(f"{path}: unknown data format (expected .jsonl, .parquet or .array_record)")


# -------------------------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | os.PathLike):
    """A `tokenizers.Tokenizer` from a tokenizer.json (a file, or a directory holding one)."""
    from tokenizers import Tokenizer
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    return Tokenizer.from_file(str(path))


def special_id(tokenizer, token: int | str | None, names: Sequence[str], what: str) -> int:
    """`token` as an id: an int is taken as is, a string looked up; None tries the usual names."""
    if isinstance(token, int):
        return token
    candidates = [token] if token is not None else list(names)
    for name in candidates:
        found = tokenizer.token_to_id(name)
        if found is not None:
            return int(found)
    raise ValueError(f"the tokenizer has no {what} token among {candidates}; pass its id or name")


def train_tokenizer(files: Sequence[str | os.PathLike], vocab_size: int, out: str | os.PathLike | None = None,
                    *, special_tokens: Sequence[str] = SPECIAL_TOKENS, min_frequency: int = 2):
    """Trains a byte-level BPE tokenizer on local text files (nothing downloaded). The special tokens take
    ids 0.. in order (default PAD 0, BOS 1, EOS 2, MASK 3, as the byte tokenizer). Saves to `out` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(f) for f in files], trainer)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(out))
    return tokenizer


# ---------------------------------------------------------------------------------------------- packing

def _pack_iter_dataset():
    """The packing stage as a grain IterDataset (defined lazily: grain is an optional dependency)."""
    import grain

    class PackIterDataset(grain.IterDataset):
        """Concatenates the parent's 1-D token arrays and cuts the stream into rows of `length`."""

        def __init__(self, parent, length: int):
            super().__init__(parent)
            self.length = length

        def __iter__(self):
            return PackIterator(self._parent.__iter__(), self.length)

    class PackIterator(grain.DatasetIterator):
        def __init__(self, parent, length: int):
            super().__init__(parent)
            self.length = length
            self._doc_state = parent.get_state()   # the parent's state before `_doc` was read
            self._doc = np.zeros((0,), np.int32)
            self._offset = 0

        def __next__(self) -> np.ndarray:
            row = np.empty((self.length,), np.int32)
            filled = 0
            while filled < self.length:
                if self._offset == len(self._doc):
                    self._doc_state = self._parent.get_state()
                    self._doc = np.asarray(next(self._parent), np.int32)   # StopIteration ends the stream
                    self._offset = 0
                take = min(self.length - filled, len(self._doc) - self._offset)
                row[filled:filled + take] = self._doc[self._offset:self._offset + take]
                filled += take
                self._offset += take
            return row

        def get_state(self) -> dict:
            return {"document": self._doc_state, "offset": int(self._offset)}

        def set_state(self, state: dict) -> None:
            self._parent.set_state(state["document"])
            self._doc_state = state["document"]
            if state["offset"] == 0:
                self._doc, self._offset = np.zeros((0,), np.int32), 0
            else:
                self._doc = np.asarray(next(self._parent), np.int32)
                self._offset = int(state["offset"])

    return PackIterDataset


@dataclasses.dataclass(frozen=True)
class TextPipelineConfig:
    """What a text pipeline reads and how. `batch_size` is per host (the global batch is batch_size ×
    shard_count); `shard_index` / `shard_count` default to `jax.process_index()` / `jax.process_count()`."""
    data: tuple[str, ...]
    tokenizer: str
    seq_len: int
    batch_size: int
    field: str = "text"
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = None
    shard_index: Optional[int] = None
    shard_count: Optional[int] = None
    eos_token: int | str | None = None
    bos_token: int | str | None = None
    add_bos: bool = False

    def __post_init__(self):
        if isinstance(self.data, (str, os.PathLike)):
            object.__setattr__(self, "data", (str(self.data),))
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError(f"seq_len ({self.seq_len}) and batch_size ({self.batch_size}) must be >= 1")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")


class TextPipeline:
    """The grain pipeline of the module docstring. `iterator()` gives a fresh (or, with `state`, a resumed)
    iterator of (batch_size, seq_len) int32 batches; `documents()` the document indices this shard reads
    in order (for checking sharding)."""

    def __init__(self, config: TextPipelineConfig, *, source=None, tokenizer=None):
        self.config = config
        self.source = source if source is not None else open_source(config.data, config.field)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        self.eos_id = special_id(self.tokenizer, config.eos_token, EOS_NAMES, "EOS")
        self.bos_id = special_id(self.tokenizer, config.bos_token, BOS_NAMES, "BOS") if config.add_bos else None
        shard_index, shard_count = config.shard_index, config.shard_count
        if shard_index is None or shard_count is None:
            import jax
            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
        if len(self.source) < shard_count:
            raise ValueError(f"{len(self.source)} documents cannot be split over {shard_count} shards")
        self.shard_index, self.shard_count = shard_index, shard_count

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def _indices(self):
        import grain
        ds = grain.MapDataset.range(len(self.source))[self.shard_index::self.shard_count]
        if self.config.shuffle:
            ds = ds.shuffle(seed=self.config.seed)
        return ds.repeat(self.config.num_epochs)

    def documents(self) -> list[int]:
        """The source indices this shard reads, in order (all epochs; needs num_epochs)."""
        if self.config.num_epochs is None:
            raise ValueError("documents() lists a finite run: set num_epochs")
        return [int(i) for i in self._indices()]

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if self.bos_id is not None else []
        return np.asarray(head + ids + [self.eos_id], np.int32)

    def dataset(self):
        """The grain IterDataset of batches."""
        source, encode = self.source, self.encode
        docs = self._indices().map(lambda i: encode(source[int(i)]))
        packed = _pack_iter_dataset()(docs.to_iter_dataset(), self.config.seq_len)
        return packed.batch(self.config.batch_size, drop_remainder=True,
                            batch_fn=lambda rows: np.stack(rows).astype(np.int32))

    def iterator(self, state: Optional[dict] = None):
        it = iter(self.dataset())
        if state is not None:
            it.set_state(state)
        return it


class TextBatches:
    """A training-loop `batch_fn` and `loop.DataFeed`: `batches(i)` is the pipeline's i-th batch (0-based),
    this host's (batch_size, seq_len) int32 rows (`process_local`: the loop joins every host's rows, in
    process order, into the global batch). Reads on in order; asked for a later index it reads on to it,
    for an earlier one it starts again from the beginning.

    `data_state()` is its position (the index of the next batch, the grain iterator's state before it,
    and what the pipeline reads: files, shard, shapes, seed); `loop.train` saves it inside each
    checkpoint step and hands it back with `restore_data_state` on resume, so a resumed run reads exactly
    the batches an uninterrupted one would. `batches_read` counts the batches this object has drawn from
    grain (a resumed run draws none before its checkpoint)."""

    process_local = True

    def __init__(self, pipeline: TextPipeline):
        self.pipeline = pipeline
        self._it = pipeline.iterator()
        self._next = 0
        self.batches_read = 0

    def _identity(self) -> dict:
        c, p = self.pipeline.config, self.pipeline
        return {"files": [Path(d).name for d in c.data], "documents": len(p.source), "field": c.field,
                "seq_len": c.seq_len,
                "batch_size": c.batch_size, "seed": c.seed, "shuffle": c.shuffle, "num_epochs": c.num_epochs,
                "shard_index": p.shard_index, "shard_count": p.shard_count, "eos_id": p.eos_id, "bos_id": p.bos_id}

    def data_state(self) -> dict:
        """{"next_batch": i, "iterator": grain state before batch i, "pipeline": what it reads} (JSON)."""
        return {"next_batch": self._next, "iterator": self._it.get_state(), "pipeline": self._identity()}

    def restore_data_state(self, state: dict) -> None:
        """Continues from a `data_state()`; refuses one saved by a pipeline reading something else."""
        if not isinstance(state, dict) or not {"next_batch", "iterator", "pipeline"} <= state.keys():
            raise ValueError(f"not a TextBatches data state: {str(state)[:200]}")
        saved, here = state["pipeline"], self._identity()
        differ = sorted(k for k in saved.keys() | here.keys() if saved.get(k) != here.get(k))
        if differ:
            raise ValueError("the saved data position belongs to another pipeline: "
                             + "; ".join(f"{k} saved {saved.get(k)!r}, now {here.get(k)!r}" for k in differ))
        self._it = self.pipeline.iterator(state["iterator"])
        self._next = int(state["next_batch"])

    def __call__(self, index: int) -> np.ndarray:
        if index < 0:
            raise IndexError(f"batch index must be >= 0, got {index}")
        if index < self._next:   # an earlier batch: from the start
            self._it, self._next = self.pipeline.iterator(), 0
        while self._next < index:
            next(self._it)
            self._next += 1
            self.batches_read += 1
        batch = next(self._it)
        self._next += 1
        self.batches_read += 1
        return batch


# -------------------------------------------------------------------------------------------------- CLI

def text_to_jsonl(text_path: str | os.PathLike, out: str | os.PathLike, field: str = "text") -> int:
    """A plain text file → JSONL, one document per blank-line-separated paragraph; returns the count."""
    paragraphs = [p.strip() for p in Path(text_path).read_text(encoding="utf-8").split("\n\n")]
    docs = [p for p in paragraphs if p]
    with open(out, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({field: doc}, ensure_ascii=False) + "\n")
    return len(docs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m twotower_jax.data.text_pipeline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on local text files")
    t.add_argument("--input", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="tokenizer.json to write")
    j = sub.add_parser("to-jsonl", help="a text file -> JSONL, one document per paragraph")
    j.add_argument("--input", required=True)
    j.add_argument("--out", required=True)
    j.add_argument("--field", default="text")
    k = sub.add_parser("peek", help="print the first packed batches of a pipeline, decoded")
    k.add_argument("--data", nargs="+", required=True)
    k.add_argument("--tokenizer", required=True)
    k.add_argument("--seq-len", type=int, default=128)
    k.add_argument("--batch-size", type=int, default=2)
    k.add_argument("--batches", type=int, default=1)
    k.add_argument("--field", default="text")
    k.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.command == "train-tokenizer":
        tok = train_tokenizer(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency)
        print(f"wrote {args.out}: vocab {tok.get_vocab_size()}, specials "
              + ", ".join(f"{s}={tok.token_to_id(s)}" for s in SPECIAL_TOKENS))
    elif args.command == "to-jsonl":
        print(f"wrote {args.out}: {text_to_jsonl(args.input, args.out, args.field)} documents")
    else:
        pipeline = TextPipeline(TextPipelineConfig(data=tuple(args.data), tokenizer=args.tokenizer,
                                                   seq_len=args.seq_len, batch_size=args.batch_size,
                                                   field=args.field, seed=args.seed, shard_index=0, shard_count=1))
        print(f"{pipeline.source}; vocab {pipeline.vocab_size}; EOS id {pipeline.eos_id}")
        it = pipeline.iterator()
        for b in range(args.batches):
            batch = next(it)
            for r, row in enumerate(batch):
                text = pipeline.tokenizer.decode(row.tolist(), skip_special_tokens=False)
                print(f"--- batch {b} row {r} ({len(row)} tokens)\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
