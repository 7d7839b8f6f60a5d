"""A corpus cut into shards, each read and written on its own: what makes a corpus run
exactly-once and resumable.

A shard is a fixed slice of one input file (a byte range of JSON Lines, a row range of a
Parquet row group), named by a hash of where it lies, so the same inputs always plan the
same shards. Its output part is written under a hidden temporary name and renamed into
place: a reader never sees half a part, a retried shard replaces its part with identical
rows, and a rerun skips every shard whose part exists.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from siren_runtime.records import InputError, Record, parse_json_record, record_from_object

#: input file suffixes a folder is searched for
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: the Parquet columns a record is made of (others are ignored)
RECORD_COLUMNS = ("id", "text", "prompt", "response", "messages", "tools", "threshold")
#: a temporary part's name starts with this ('.' hides it from Parquet dataset readers)
TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Shard:
    """One slice of one input file: JSON Lines bytes [start, stop) whose first line is
    `first` (1-based), or rows [start, stop) of a Parquet row group, the first being row
    `first` of the file."""
    path: str
    kind: str                  # "jsonl" | "parquet"
    start: int
    stop: int
    first: int
    rows: int                  # records planned (non-blank lines, or rows)
    file_index: int
    index: int                 # within its file
    row_group: int = -1

    @property
    def key(self) -> str:
        where = f"{self.path}|{self.kind}|{self.row_group}|{self.start}|{self.stop}"
        return hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()[:12]

    def part_name(self, fmt: str) -> str:
        return f"part-{self.file_index:05d}-{self.index:06d}-{self.key}.{'parquet' if fmt == 'parquet' else 'jsonl'}"

    def to_dict(self) -> dict:
        return asdict(self)


def input_files(inputs: Iterable[str]) -> list[Path]:
    """Files named, and the JSON Lines / Parquet files of folders named (sorted, recursive)."""
    found: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))
                            and p.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES)
            if not inside:
                raise FileNotFoundError(f"{path}: no .jsonl or .parquet files in this folder")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    seen, unique = set(), []
    for path in found:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(resolved)
    return unique


def kind_of(path: Path) -> str:
    return "parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "jsonl"


def plan_shards(files: list[Path], rows_per_shard: int) -> list[Shard]:
    """Every input cut into shards of at most `rows_per_shard` records (one pass over each
    JSON Lines file to find line offsets; Parquet from its footer)."""
    shards: list[Shard] = []
    for file_index, path in enumerate(files):
        plan = _plan_parquet if kind_of(path) == "parquet" else _plan_jsonl
        shards.extend(plan(path, file_index, rows_per_shard))
    return shards


def _plan_jsonl(path: Path, file_index: int, rows_per_shard: int) -> list[Shard]:
    shards, start, first, rows, offset, line = [], 0, 1, 0, 0, 0
    with open(path, "rb") as source:
        for raw in source:
            line += 1
            if rows == 0:
                start, first = offset, line
            offset += len(raw)
            rows += bool(raw.strip())
            if rows == rows_per_shard:
                shards.append(Shard(str(path), "jsonl", start, offset, first, rows, file_index, len(shards)))
                rows = 0
    if rows:
        shards.append(Shard(str(path), "jsonl", start, offset, first, rows, file_index, len(shards)))
    return shards


def _plan_parquet(path: Path, file_index: int, rows_per_shard: int) -> list[Shard]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    shards, before = [], 0
    for group in range(meta.num_row_groups):
        size = meta.row_group(group).num_rows
        for start in range(0, size, rows_per_shard):
            stop = min(size, start + rows_per_shard)
            shards.append(Shard(str(path), "parquet", start, stop, before + start + 1, stop - start, file_index,
                                len(shards), row_group=group))
        before += size
    return shards


def read_shard(shard: Shard, errors: str = "fail") -> tuple[list[Record], list[str]]:
    """The shard's records, and the messages of those skipped (errors="skip"); a bad
    record raises InputError naming the file and line (errors="fail")."""
    records, skipped = [], []
    for number, make in _raw_records(shard):
        try:
            records.append(make())
        except InputError as e:
            message = f"{shard.path}: {e}"
            if errors != "skip":
                raise InputError(message) from None
            skipped.append(message)
    return records, skipped


def _raw_records(shard: Shard):
    if shard.kind == "parquet":
        import pyarrow.parquet as pq

        source = pq.ParquetFile(shard.path)
        columns = [c for c in RECORD_COLUMNS if c in source.schema_arrow.names]
        table = source.read_row_group(shard.row_group, columns=columns).slice(shard.start, shard.stop - shard.start)
        for n, row in enumerate(table.to_pylist()):
            present = {k: v for k, v in row.items() if v is not None}
            yield shard.first + n, (lambda present=present, n=n: record_from_object(present, shard.first + n, "row"))
        return
    with open(shard.path, "rb") as source:
        source.seek(shard.start)
        chunk = source.read(shard.stop - shard.start)
    for n, raw in enumerate(chunk.splitlines(keepends=True)):
        if raw.strip():
            yield shard.first + n, (lambda raw=raw, n=n: _json_line(raw, shard.first + n))


def _json_line(raw: bytes, number: int) -> Record:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})") from None
    return parse_json_record(line.rstrip("\r\n"), number)


def output_id(record: Record, shard: Shard):
    """The input's id, else where the record came from ("file:line")."""
    if "id" in record.echo:
        return record.echo["id"]
    number = record.echo.get("line", record.echo.get("row"))
    return f"{Path(shard.path).name}:{number}"


#: the typed output columns (so a part whose onsets are all null still reads as int64)
_PARQUET_TYPES = {"score": "float64", "flagged": "bool", "onset": "int64"}


def write_part(out_dir: Path, name: str, columns: dict, fmt: str) -> None:
    """Write one part atomically: a hidden temporary file, fsynced, renamed into place."""
    temp = out_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            arrays = {}
            for key, values in columns.items():
                try:
                    arrays[key] = pa.array(values, type=_PARQUET_TYPES.get(key))
                except (pa.ArrowInvalid, pa.ArrowTypeError):      # ids of mixed types: their JSON text
                    arrays[key] = pa.array([json.dumps(v, ensure_ascii=False) for v in values])
            pq.write_table(pa.table(arrays), temp)
        else:
            names = list(columns)
            rows = zip(*(columns[k] for k in names))
            with open(temp, "w", encoding="utf-8") as out:
                for row in rows:
                    out.write(json.dumps(dict(zip(names, row)), ensure_ascii=False) + "\n")
        with open(temp, "rb+") as done:
            os.fsync(done.fileno())
        os.replace(temp, out_dir / name)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def part_rows(path: Path) -> int:
    """Rows in a written part (the Parquet footer, or lines)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as part:
        return sum(1 for _ in part)


def file_fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def clear_temporaries(out_dir: Path) -> int:
    """Remove the temporary parts an interrupted run left behind."""
    stale = [p for p in out_dir.glob(TEMP_PREFIX + "*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)

