"""Data larger than memory (``data.streaming: true``): the training split read as it is used.

``data.train`` may be one file, a glob (``data/train-*.parquet``) or a folder of shards in Parquet,
JSON Lines (``.jsonl``, ``.jsonl.gz``, ...), JSON, CSV/TSV or plain text. The shards are opened with
``datasets`` streaming (``load_dataset(..., streaming=True)``: Arrow reads them a chunk or a row
group at a time), the shard order drawn per epoch from ``train.seed``, split between processes,
shuffled through a bounded buffer (:func:`buffer_shuffle`), turned into examples by the task, tokenised
in small batches and packed into rows on the fly. Nothing is materialised, in memory or on disk:
memory holds the shuffling buffer, one tokenisation batch and the open rows, however large the
data (BENCHMARKS.md "Streaming").

Splitting between processes (``datasets.distributed.split_dataset_by_node``): when the number of
shards divides by the number of processes each process reads only its own shards; otherwise each
reads all of them and keeps one example in N. Either way no example is trained twice per epoch,
and each process tokenises only its own examples. Accelerate is not asked to split the stream
again (its ``IterableDatasetShard`` would make every process tokenise everything, and dispatching
would make one process read for all): the loop wraps it for device placement only. Because the
processes' shares need not hold the same number of rows, the loop ends an epoch for every process
as soon as one runs out (``TrainingLoop._stream_batches``).

A stream has no length, so ``train.max_steps`` sets the run's length; an epoch is one pass over the
stream. Validation and test come from ``data.validation`` / ``data.test`` (small files, read as
usual) or are the first ``data.validation_size`` / ``data.test_size`` examples of the stream in
file order (counts); those examples, and any repeat of them, never reach training (they are
recognised by content). Exact resume works as for loaded data: a stream is a pure function of
``(seed, epoch)``, so the loop re-reads the epoch and skips the batches it had used.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from datasets.distributed import split_dataset_by_node

from lmtune.config import DataConfig
from lmtune.data.chat import adds_bos, render_conversation, to_messages
from lmtune.data.chat import detect_format as detect_chat_format
from lmtune.data.chat_tools import check_tool_support, record_tools
from lmtune.data.files import check_data_path
from lmtune.data.mixing import MIX_COLUMN, check_same_columns, note_mix, rename_columns
from lmtune.data.packing import Row, iter_pack_stream, segment
from lmtune.data.readers import detect_format, resolve_source
from lmtune.data.splits import given_splits
from lmtune.data.table import Table
from lmtune.errors import DataError

log = logging.getLogger(__name__)

# lmtune's format names -> the datasets builder that streams them.
_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "tsv": "csv", "text": "text"}
# data.document_split -> the text builder's sample_by.
_SAMPLE_BY = {"line": "line", "paragraph": "paragraph", "file": "document"}
# Token sequences tokenised per call: the fast tokenizer's batch call is several times quicker than
# one document at a time, and this few documents keep memory flat.
ENCODE_BATCH = 256
Sequences = list[tuple[list[int], list[int]]]


# ------------------------------------------------------------------------------------------ sources
def stream_files(source: str, format: str = "auto") -> tuple[list[str], str]:
    """The files of ``source`` (a file, a glob or a folder of shards), sorted, and their lmtune format.

    DataError when nothing matches, when the shards mix formats, or for a format that cannot stream.
    """
    if source.startswith("bundled:"):
        files = [str(resolve_source(source))]
    elif glob.has_magic(source):
        files = sorted(f for f in glob.glob(os.path.expanduser(source), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError("no file matches this pattern", file=source, field="data.train")
    else:
        path = Path(source).expanduser()
        check_data_path(path, source)
        if path.is_dir():
            files = sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
                           and _known_format(p))
            if not files:
                raise DataError("the folder holds no data shards (.parquet, .jsonl, .json, .csv, .tsv, .txt, "
                                "optionally .gz/.bz2/.xz)", file=source, field="data.train")
        else:
            files = [str(path)]
    if format != "auto":
        fmt = format
    else:
        found = {f: detect_format(Path(f)) for f in files}
        kinds = sorted(set(found.values()))
        if len(kinds) > 1:
            example = {k: next(f for f, v in found.items() if v == k) for k in kinds}
            raise DataError("the shards mix formats: " + ", ".join(f"{k} ({Path(f).name})" for k, f in example.items()),
                            file=source, hint="keep one format per data.train pattern, or narrow the pattern")
        fmt = kinds[0]
    if fmt not in _BUILDERS:
        raise DataError(f"format '{fmt}' cannot be streamed", file=source,
                        hint="data.streaming reads Parquet, JSON Lines, JSON, CSV/TSV or text files")
    return files, fmt


def _known_format(path: Path) -> bool:
    try:
        return detect_format(path) in _BUILDERS
    except DataError:
        return False


class StreamSource:
    """The shards of ``data.train`` (or of ``path``, read as ``format``) and how ``datasets`` streams them;
    opened anew for every pass."""

    def __init__(self, data: DataConfig, path: str | None = None, format: str | None = None) -> None:
        self.display = path or data.train
        self.files, self.format = stream_files(self.display, format or data.format)
        self.kwargs: dict[str, Any] = {}
        if self.format != "parquet":
            self.kwargs["encoding"] = data.encoding
        if self.format == "tsv":
            self.kwargs["sep"] = "\t"
        if self.format == "text":
            self.kwargs["sample_by"] = _SAMPLE_BY[data.document_split]

    @property
    def n_shards(self) -> int:
        """How many files the stream reads (the unit of splitting between processes)."""
        return len(self.files)

    def open(self, files: list[str] | None = None, seed: int = 0) -> datasets.IterableDataset:
        """The records of every shard (of ``files``, in that order; default: all, in file order), as a
        ``datasets.IterableDataset`` (``seed``: the draws of a mixed source, :class:`MixedStreamSource`)."""
        try:
            return datasets.load_dataset(_BUILDERS[self.format], data_files=files or self.files, split="train",
                                         streaming=True, **self.kwargs)
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
            raise DataError(f"cannot open the data as a {self.format} stream: {exc}", file=self.display) from None

    def records(self, ds: Iterable[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
        """Records of ``ds`` (default: the whole stream in file order); reading errors become DataErrors."""
        it = iter(self.open() if ds is None else ds)
        n = 0
        while True:
            try:
                record = next(it)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as exc:  # pyarrow/json parse errors surface from deep inside datasets
                raise DataError(f"cannot read the stream after {n} records: {_short(exc)}", file=self.display,
                                hint="check the shards of data.train (one bad line stops the stream)") from None
            n += 1
            yield record


class MixedStreamSource(StreamSource):
    """A mixed ``data.train`` streamed: each source's shards streamed as :class:`StreamSource` does, its columns
    renamed, tagged with :data:`MIX_COLUMN`, and interleaved with ``datasets.interleave_datasets``: each
    example drawn from a source with probability weight / sum of weights, until the first source runs out
    (``data.mix_stopping: first_exhausted``) or every one has (``all_exhausted``: the others start again).
    The draws are seeded per epoch, so a stream stays a pure function of ``(seed, epoch)``.
    """

    def __init__(self, data: DataConfig) -> None:
        sources = data.train_mix or []
        self.display = data.train
        self.sources = sources
        self.stopping = data.mix_stopping
        self.parts = [StreamSource(data, s.path, s.format) for s in sources]
        self.files = [f for part in self.parts for f in part.files]
        formats = {part.format for part in self.parts}
        self.format = formats.pop() if len(formats) == 1 else "mixed"
        # A text source's records have one column, "text": it is the config's text column in a mix.
        text_named = {} if data.text_column == "text" else {"text": data.text_column}
        self.renames = [{**(text_named if part.format == "text" and self.format != "text" else {}), **s.rename}
                        for s, part in zip(sources, self.parts, strict=True)]
        self.kwargs = {}
        self._check_columns()

    def _check_columns(self) -> None:
        """Every source's first record has the same columns once renamed (a DataError naming the file)."""
        tables = []
        for part, rename, source in zip(self.parts, self.renames, self.sources, strict=True):
            first = next(part.records(), None)
            if first is None:
                raise DataError("no records", file=part.display)
            table = Table(part.display, [first], [1], list(first), "record")
            tables.append(rename_columns(table, source.model_copy(update={"rename": rename})))
        check_same_columns(tables, self.sources)

    def open(self, files: list[str] | None = None, seed: int = 0) -> datasets.IterableDataset:
        """The sources' records interleaved by weight (each source's shards in the order of ``files``)."""
        order = files or self.files
        streams = []
        for part, rename, source in zip(self.parts, self.renames, self.sources, strict=True):
            mine = set(part.files)
            ds = part.open([f for f in order if f in mine])
            if rename:
                ds = ds.rename_columns(rename)
            streams.append(ds.map(lambda _, name=source.name: {MIX_COLUMN: name}))
        total = sum(s.weight for s in self.sources)
        return datasets.interleave_datasets(streams, probabilities=[s.weight / total for s in self.sources],
                                            seed=seed, stopping_strategy=self.stopping)

    def record(self) -> dict[str, Any]:
        """The mix as the report shows it (``data.json`` ``mix``): weights and target shares; a stream's
        counts are not known in advance."""
        total = sum(s.weight for s in self.sources)
        return {"streamed": True, "stopping": self.stopping,
                "sources": [{"source": s.name, "weight": s.weight, "target_share": s.weight / total,
                             "shards": len(p.files), "format": p.format}
                            for s, p in zip(self.sources, self.parts, strict=True)]}


def stream_source(data: DataConfig) -> StreamSource:
    """The training stream's source: :class:`MixedStreamSource` for a mixed ``data.train`` (its record goes to
    :func:`lmtune.data.mixing.recording`), else :class:`StreamSource`."""
    if data.train_mix is None:
        return StreamSource(data)
    source = MixedStreamSource(data)
    note_mix(source.record())
    return source


def _short(exc: BaseException) -> str:
    # datasets wraps the real error; its cause says what is wrong with the file.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def content_key(value: Any) -> bytes:
    """A short fingerprint of an example's content: held-out examples are kept out of training by it."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def head_examples(source: StreamSource, to_example: Callable[[dict[str, Any], int], Any | None],
                  count: int) -> list[Any]:
    """The first ``count`` examples of the stream in file order (records ``to_example`` turns into None skipped)."""
    out: list[Any] = []
    if count <= 0:
        return out
    for position, record in enumerate(source.records(), start=1):
        example = to_example(record, position)
        if example is not None:
            out.append(example)
            if len(out) == count:
                break
    return out


# ------------------------------------------------------------------------------------------ rows
def single_rows(sequences: Iterable[tuple[list[int], list[int]]], max_length: int) -> Iterator[Row]:
    """One row per sequence, cut into several rows of ``max_length`` when longer (unpacked training)."""
    for ids, labels in sequences:
        for i in range(0, len(ids), max_length):
            yield {"input_ids": ids[i : i + max_length], "labels": labels[i : i + max_length]}


def first_fit_rows(sequences: Iterable[tuple[Sequence[int], Sequence[int]]], row_length: int,
                   open_rows: int) -> Iterator[Row]:
    """Whole sequences packed first-fit into at most ``open_rows`` open rows of ``row_length`` tokens.

    The streaming counterpart of :func:`lmtune.data.packing.pack_whole`: a sequence goes into the
    first open row with room for it; when none has room and ``open_rows`` are open, the fullest
    row is emitted to make place. A full row is emitted at once, the rest when the stream ends.
    Every sequence must fit a row (callers skip or truncate longer ones first).
    """
    rows: list[list[tuple[Sequence[int], Sequence[int]]]] = []
    room: list[int] = []

    def emit(b: int) -> Row:
        members = rows.pop(b)
        room.pop(b)
        ids: list[int] = []
        lab: list[int] = []
        pos: list[int] = []
        for seq in members:
            seg_ids, seg_lab, seg_pos = segment(*seq)
            ids += seg_ids
            lab += seg_lab
            pos += seg_pos
        return {"input_ids": ids, "labels": lab, "position_ids": pos}

    for seq in sequences:
        n = len(seq[0])
        if n > row_length:
            raise ValueError(f"a sequence of {n} tokens is longer than the row length {row_length}")
        for b, free in enumerate(room):
            if n <= free:
                rows[b].append(seq)
                room[b] -= n
                if room[b] == 0:
                    yield emit(b)
                break
        else:
            if len(rows) == open_rows:
                yield emit(min(range(len(room)), key=room.__getitem__))
            rows.append([seq])
            room.append(row_length - n)
            if n == row_length:
                yield emit(len(rows) - 1)
    while rows:
        yield emit(0)


class TrainStream(torch.utils.data.IterableDataset):
    """The training split as a stream of rows: records -> shuffle -> this process's share -> examples ->
    token sequences -> rows. A pure function of ``(seed, epoch)``: the same epoch gives the same rows.

    ``to_example(record, position)`` turns a record into the task's example (None: skip it, e.g. an
    empty text), ``key(example)`` is what :func:`content_key` fingerprints to keep held-out examples
    out, ``encode(examples)`` gives ``(input_ids, labels)`` per example (None where it is skipped),
    and ``to_rows(sequences)`` packs them.
    """

    def __init__(self, source: StreamSource, *, seed: int, shuffle_buffer: int, held_out: set[bytes],
                 to_example: Callable[[dict[str, Any], int], Any | None], key: Callable[[Any], Any],
                 encode: Callable[[list[Any]], list[tuple[list[int], list[int]] | None]],
                 to_rows: Callable[[Iterator[tuple[list[int], list[int]]]], Iterator[Row]],
                 rank: int = 0, world_size: int = 1) -> None:
        self.source = source
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.held_out = held_out
        self.to_example = to_example
        self.key = key
        self.encode = encode
        self.to_rows = to_rows
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the pass (its shuffle order) the next ``__iter__`` yields."""
        self.epoch = epoch

    def _records(self) -> Iterator[dict[str, Any]]:
        """This process's records of the current epoch: shards in an order drawn for the epoch, this
        process's share of them, through the shuffling buffer.

        Shuffled here rather than by ``IterableDataset.shuffle``: for Parquet that turns every row group
        into a data source and reads one ahead from each, so its memory grew with the data (measured
        +130 MiB at 84 MiB of text, 8 shards; this buffer: flat), and it sleeps 5 s after every pass.
        """
        files = list(self.source.files)
        if self.shuffle_buffer:
            random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(files)
        ds = self.source.open(files, seed=random.Random(f"mix:{self.seed}:{self.epoch}").randrange(2**32))
        if self.world_size > 1:
            # Shards r, r+N, ... of the epoch's order when they divide by N processes, else every N-th example.
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        records = self.source.records(ds)
        if not self.shuffle_buffer:
            return records
        return buffer_shuffle(records, self.shuffle_buffer,
                              random.Random(f"buffer:{self.seed}:{self.epoch}:{self.rank}"))

    def sequences(self) -> Iterator[tuple[list[int], list[int]]]:
        """This process's token sequences of the current epoch, in stream order."""
        batch: list[Any] = []
        for position, record in enumerate(self._records(), start=1):
            example = self.to_example(record, position)
            if example is None or content_key(self.key(example)) in self.held_out:
                continue
            batch.append(example)
            if len(batch) == ENCODE_BATCH:
                yield from (s for s in self.encode(batch) if s is not None)
                batch = []
        if batch:
            yield from (s for s in self.encode(batch) if s is not None)

    def __iter__(self) -> Iterator[Row]:
        for row in self.to_rows(self.sequences()):
            row.pop("segments", None)
            yield row


def buffer_shuffle(items: Iterable[Any], size: int, rng: Any) -> Iterator[Any]:
    """``items`` in a shuffled order, holding at most ``size`` of them: once the buffer is full, each new
    item takes the place of a random buffered one, which is yielded; the rest leave in random order."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def process_share() -> tuple[int, int]:
    """``(rank, world size)`` of this process as Accelerate (torchrun, accelerate launch) set them."""
    state = PartialState()
    return state.process_index, state.num_processes


def stream_info(source: StreamSource, data: DataConfig, world_size: int) -> dict[str, Any]:
    """Facts about the training stream for ``data.json`` and the report."""
    by_shards = world_size > 1 and source.n_shards % world_size == 0
    return {
        "source": f"{data.train} (streamed: {source.n_shards} shard(s), shuffle buffer {data.shuffle_buffer})",
        "streaming": True, "format": source.format, "shards": source.n_shards,
        "shuffle_buffer": data.shuffle_buffer, "processes": world_size,
        "split_between_processes": "by shard" if by_shards else ("by example" if world_size > 1 else "none"),
    }


# ------------------------------------------------------------------------------------------ streams
def open_document_stream(
    data: DataConfig, tokenizer: Any, *, seed: int, packing: bool,
    read_documents: Callable[[str], tuple[list[str], dict[str, Any]]],
) -> tuple[dict[str, tuple[list[str], dict[str, Any]]], TrainStream, dict[str, Any]]:
    """Plain-text documents (language-model training): the evaluation documents per split with their
    facts, the training stream of packed (``packing``) or single rows, and facts about it.

    ``seed`` draws the shuffles (``train.seed``); ``read_documents(source)`` reads an evaluation split
    that has a file of its own (the documents, and facts about them), as the task reads loaded data.
    """
    d = data
    source = stream_source(d)
    column = "text" if source.format == "text" else d.text_column

    def to_doc(record: dict[str, Any], position: int) -> str | None:
        if column not in record:
            raise DataError(f"no column named '{column}'; the columns are: {', '.join(map(repr, record))}",
                            file=d.train, field="data.text_column")
        value = record[column]
        if isinstance(value, str) and source.format == "text":
            value = value.strip("\r\n")
        if value is None or (isinstance(value, str) and not value.strip()):
            if d.empty_text == "error" and source.format != "text":
                raise DataError(f"empty text in example {position} of the stream", file=d.train, field=column,
                                hint="set data.empty_text: skip to drop such rows")
            return None
        if not isinstance(value, str):
            raise DataError(f"expected text, found {type(value).__name__} in example {position} of the stream",
                            file=d.train, field=column)
        return value

    docs: dict[str, tuple[list[str], dict[str, Any]]] = {}
    sizes = {s: int(getattr(d, f"{s}_size")) for s in ("validation", "test") if getattr(d, s) is None}
    # One more than the hold-out: the stream must leave something to train on.
    head = head_examples(source, to_doc, sum(sizes.values()) + 1) if sizes else []
    if len(head) <= sum(sizes.values()) and sizes:
        raise DataError(f"the stream holds {len(head)} document(s), too few to hold out "
                        + " and ".join(f"{n} for {s}" for s, n in sizes.items()) + " and train on the rest",
                        file=d.train, hint="lower data.validation_size / data.test_size or give files")
    start = 0
    for split, n in sizes.items():
        docs[split] = (head[start : start + n], {"source": f"{d.train} (examples {start + 1}-{start + n} of the stream)"})
        start += n
    head = head[:start]
    for split, src in given_splits(d).items():
        docs[split] = read_documents(src)
    held = {content_key(x) for x in head}
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id]

    def encode(batch: list[str]) -> list[tuple[list[int], list[int]] | None]:
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        return [(s, s) for s in (bos + x + eos for x in ids)]

    def to_rows(seqs: Iterator[tuple[list[int], list[int]]]) -> Iterator[Row]:
        return iter_pack_stream(seqs, d.max_length) if packing else single_rows(seqs, d.max_length)

    rank, world = process_share()
    stream = TrainStream(source, seed=seed, shuffle_buffer=d.shuffle_buffer, held_out=held,
                         to_example=to_doc, key=lambda x: x, encode=encode, to_rows=to_rows, rank=rank,
                         world_size=world)
    info = {**stream_info(source, d, world), "packing": packing}
    return docs, stream, info


def open_conversation_stream(
    data: DataConfig, tokenizer: Any, *, seed: int, packing: bool,
    read_conversations: Callable[[str], tuple[list[dict[str, Any]], dict[str, Any]]],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any], TrainStream, list[Any]]:
    """Chat conversations (instruction tuning): the evaluation conversations per split with their facts,
    the training stream (whole conversations rendered with the tokenizer's chat template, packed first-fit
    with ``packing``), and the first rendered training examples (for the pre-flight checks).

    ``seed`` draws the shuffles (``train.seed``); ``read_conversations(source)`` reads an evaluation split
    that has a file of its own (records ``{messages, line}``, and facts about them).
    """
    d = data
    source = stream_source(d)
    first = head_examples(source, lambda r, _: r, 50)
    if not first:
        raise DataError("no conversations", file=d.train)
    fmt = d.chat_format if d.chat_format != "auto" else detect_chat_format(first, d.columns, d.train)

    def to_record(record: dict[str, Any], position: int) -> dict[str, Any]:
        # `line` is the position in the stream of this process (the stream has no file lines).
        where = f"{d.train} (stream)"
        messages = to_messages(record, fmt, d.columns, source=where, line=position)
        tools = record_tools(record, fmt, d.columns, source=where, line=position)
        check_tool_support(tokenizer, messages, tools, source=where, line=position)
        return {"messages": messages, "line": position, **({"tools": tools} if tools else {})}

    sizes = {s: int(getattr(d, f"{s}_size")) for s in ("validation", "test") if getattr(d, s) is None}
    preflight_count = 200
    head = head_examples(source, to_record, sum(sizes.values()) + preflight_count)
    if len(head) <= sum(sizes.values()):
        raise DataError(f"the stream holds {len(head)} conversation(s), too few to hold out "
                        + " and ".join(f"{n} for {s}" for s, n in sizes.items()) + " and train on the rest",
                        file=d.train, hint="lower data.validation_size / data.test_size or give files")
    splits: dict[str, list[dict[str, Any]]] = {}
    info: dict[str, Any] = {}
    start = 0
    for split, n in sizes.items():
        splits[split] = head[start : start + n]
        info[split] = {"source": f"{d.train} (examples {start + 1}-{start + n} of the stream)"}
        start += n
    for split, src in given_splits(d).items():
        splits[split], info[split] = read_conversations(src)
    held = {content_key(r["messages"]) for r in head[:start]}

    def render(records: list[dict[str, Any]]) -> list[Any]:
        return [render_conversation(tokenizer, r["messages"], train_on=d.train_on, max_length=d.max_length,
                                    too_long=d.too_long, special_tokens_in_content=d.special_tokens_in_content,
                                    tools=r.get("tools"))
                for r in records]

    preview = [ex for ex in render(head[start:]) if ex is not None]

    def encode(batch: list[dict[str, Any]]) -> list[tuple[list[int], list[int]] | None]:
        # Too long for data.max_length: skipped, as when the data is loaded (counted there, not here).
        return [None if ex is None else (list(ex.input_ids), list(ex.labels)) for ex in render(batch)]

    def to_rows(seqs: Iterator[tuple[list[int], list[int]]]) -> Iterator[Row]:
        if packing:
            return first_fit_rows(seqs, d.max_length, d.open_rows)
        return single_rows(seqs, d.max_length)

    rank, world = process_share()
    stream = TrainStream(source, seed=seed, shuffle_buffer=d.shuffle_buffer, held_out=held,
                         to_example=to_record, key=lambda r: r["messages"], encode=encode, to_rows=to_rows,
                         rank=rank, world_size=world)
    info["train"] = {**stream_info(source, d, world), "chat_format": fmt, "packing": packing}
    return splits, info, stream, preview
