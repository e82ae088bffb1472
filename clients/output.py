"""The results file of `score`: CSV or JSON Lines, appended row by row, resumable.

Rows go straight to --out as they arrive, each flushed to the OS at once (a write per row is
nothing next to decoding a file), so an interrupted run leaves a valid file holding every
finished row. Reopening with resume=True
reads the rows already there (their paths are then skipped), cuts off a last row that a
hard kill left half-written, and appends; a path is never written twice. The file is
locked while open, so two runs cannot append to the same file.

Sharded (`--shard-rows N`, the default of `--engine ray`): --out `results.csv` names the family
`results.00000.csv`, `results.00001.csv`, ... of at most N rows each; a run appends to new shards,
resume reads them all (ShardedWriter), read_results("results.csv") reads them in order.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:   # pragma: no cover - not POSIX: no lock
    fcntl = None

from clients.result import Prediction

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SHARD_DIGITS = 5   # results.00000.csv: the index of a shard of a sharded --out
DIGITS = 6   # probabilities and weights are written rounded to this many decimals


class OutputError(ValueError):
    """--out cannot be written or resumed as asked."""


def columns_for(classes: Sequence[str], branches: Sequence[str]) -> list[str]:
    """path, label, confidence, prob_<class>..., weight_<branch>... (the model's modalities, then
    fusion), modalities_used, error, warning (damage found in the files; empty when clean)."""
    return (["path", "label", "confidence"] + [f"prob_{c}" for c in classes]
            + [f"weight_{b}" for b in branches] + ["modalities_used", "error", "warning"])


def _num(x: float | None) -> float | None:
    return None if x is None else round(float(x), DIGITS)


def prediction_row(key: str, pred: Prediction, classes: Sequence[str], branches: Sequence[str]) -> dict[str, Any]:
    """One output row (typed values) for a scored sample."""
    row: dict[str, Any] = {"path": key, "label": pred.label, "confidence": _num(pred.confidence)}
    for c in classes:
        row[f"prob_{c}"] = _num(pred.probabilities.get(c))
    for b in branches:
        row[f"weight_{b}"] = _num(pred.weight(b))
    row["modalities_used"] = list(pred.modalities_used)
    row["error"] = ""
    row["warning"] = " ".join("; ".join(pred.warnings).split())
    return row


def error_row(key: str, message: str, classes: Sequence[str], branches: Sequence[str]) -> dict[str, Any]:
    """One output row for a sample that could not be scored (message on one line)."""
    row: dict[str, Any] = {c: None for c in columns_for(classes, branches)}
    row.update(path=key, label="", modalities_used=[], error=" ".join(str(message).split()) or "error", warning="")
    return row


def result_row(key: str, pred: Prediction | None, error: str | None, classes: Sequence[str],
               branches: Sequence[str]) -> dict[str, Any]:
    """The row of a scorer's result (a prediction, or the error that stopped it): every engine's rows come
    from here (local, remote, and on Ray workers)."""
    return (prediction_row(key, pred, classes, branches) if pred is not None
            else error_row(key, error or "error", classes, branches))


# ---------------------------------------------------------------------------------------
# encoding rows

def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{DIGITS}f}"
    if isinstance(v, (list, tuple)):
        return "+".join(v)
    return str(v)


def _csv_value(col: str, text: str) -> Any:
    """A CSV cell back to the typed value prediction_row made."""
    if col == "modalities_used":
        return [m for m in text.split("+") if m]
    if col in ("path", "label", "error", "warning"):
        return text
    return float(text) if text else None


def _split_csv_records(data: bytes) -> tuple[list[bytes], int]:
    """Complete CSV records of data and the byte length they span (a quoted newline stays inside)."""
    records, start, quotes, pos = [], 0, 0, 0
    for line in data.splitlines(keepends=True):
        pos += len(line)
        quotes += line.count(b'"')
        if line.endswith(b"\n") and quotes % 2 == 0:   # "" escapes keep the count even
            records.append(data[start:pos])
            start, quotes = pos, 0
    return records, start


def _parse_existing(data: bytes, fmt: str, columns: list[str], where: Path
                    ) -> tuple[list[dict[str, Any]], int, bool]:
    """(rows, length of the complete rows, has_header) of an existing results file.

    Only a last row without its line end (what a hard kill leaves) is left out; a damaged
    row before it is an error, so that resuming never silently drops finished rows.
    """
    rows: list[dict[str, Any]] = []
    if fmt == "jsonl":
        good = 0
        for n, line in enumerate(data.splitlines(keepends=True), start=1):
            if not line.endswith(b"\n"):
                break   # the half-written last row
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                obj = None
            if not isinstance(obj, dict) or "path" not in obj:
                raise OutputError(f"{where}, line {n}: not a result row; repair or remove it, or choose another --out")
            if list(obj) != columns:
                raise OutputError(f"{where}: rows have columns {list(obj)}, but this model writes {columns} "
                                  "(another model's results?); choose another --out")
            rows.append(obj)
            good += len(line)
        tail = data[good:]
        if tail and not (tail.startswith(b'{"path": ') or b'{"path": '.startswith(tail)):
            raise OutputError(f"{where}: ends in something that is not a result row; choose another --out")
        return rows, good, True
    records, end = _split_csv_records(data)
    if not records:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(columns)
        if not buf.getvalue().encode().startswith(data):   # not our header cut short: someone else's file
            raise OutputError(f"{where}: not a results file of this model; choose another --out")
        return [], 0, False
    header = next(csv.reader(io.StringIO(records[0].decode("utf-8", "replace"))), [])
    if header != columns:
        raise OutputError(f"{where}: header {header} differs from this model's columns {columns} "
                          "(another model's results?); choose another --out")
    for n, rec in enumerate(records[1:], start=2):
        try:
            cells = next(csv.reader(io.StringIO(rec.decode("utf-8"))))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            cells = []
        if len(cells) != len(columns):
            raise OutputError(f"{where}, record {n}: not a result row; repair or remove it, or choose another --out")
        rows.append({c: _csv_value(c, v) for c, v in zip(columns, cells)})
    return rows, end, True


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """The shards of a sharded --out, in order: results.csv -> results.00000.csv, results.00001.csv, ..."""
    path = Path(path)
    pattern = re.compile(re.escape(path.stem) + rf"\.(\d{{{SHARD_DIGITS},}})" + re.escape(path.suffix) + "$")
    if not path.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def shard_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}.{index:0{SHARD_DIGITS}d}{path.suffix}")


def check_target(path: Path, *, resume: bool, overwrite: bool, shard_rows: int = 0) -> str:
    """The format of --out ("csv" | "jsonl"); OutputError if it cannot be written as asked.
    With shard_rows, --out names a family of shards (shard_paths) and those are checked."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: --out must end in .csv or .jsonl")
    if shard_rows:
        shards = shard_paths(path)
        if shards and not (resume or overwrite):
            raise OutputError(f"{path}: its shards exist ({shards[0].name}, ...): pass --resume to continue "
                              "them or --overwrite to replace them")
        return fmt
    if path.exists() and not (resume or overwrite):
        raise OutputError(f"{path} exists: pass --resume to continue it or --overwrite to replace it")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path} is not a regular file")
    return fmt


class ResultWriter:
    """Append-only writer of result rows to a .csv or .jsonl file (see module docstring)."""

    def __init__(self, path: str | os.PathLike, classes: Sequence[str], branches: Sequence[str], *,
                 resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.fmt = check_target(self.path, resume=resume, overwrite=overwrite)
        self.columns = columns_for(classes, branches)
        self.existing: list[dict[str, Any]] = []    # rows found on resume
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "a+b": never truncates on open; we lock before touching what is there
        self._f = open(self.path, "a+b")
        try:
            self._lock()
            has_header = False
            if overwrite and not resume:
                self._f.truncate(0)
            else:
                self._f.seek(0)
                data = self._f.read()
                self.existing, good, has_header = _parse_existing(data, self.fmt, self.columns, self.path)
                if good < len(data):
                    self._f.truncate(good)   # a row a hard kill cut in half: it is scored again
            self._f.seek(0, os.SEEK_END)
            self._text = io.TextIOWrapper(self._f, encoding="utf-8", newline="", write_through=False)
            self._csv = csv.writer(self._text, lineterminator="\n") if self.fmt == "csv" else None
            if self.fmt == "csv" and not has_header:
                self._csv.writerow(self.columns)
                self.flush()
        except BaseException:
            self._f.close()
            raise
        self.done: set[str] = {r["path"] for r in self.existing}
        self.written = 0

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{self.path}: another scoring run is writing this file") from None

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (a path already written is a bug in the caller: refused)."""
        key = row["path"]
        if key in self.done:
            raise OutputError(f"{self.path}: {key!r} already has a row")
        if self.fmt == "csv":
            self._csv.writerow([_csv_cell(row.get(c)) for c in self.columns])
        else:
            clean = {c: (None if isinstance(row.get(c), float) and not math.isfinite(row[c]) else row.get(c))
                     for c in self.columns}
            self._text.write(json.dumps(clean, ensure_ascii=False) + "\n")
        self.done.add(key)
        self.written += 1
        self.flush()

    def flush(self) -> None:
        self._text.flush()
        self._f.flush()

    def close(self) -> None:
        if self._f.closed:
            return
        self.flush()
        os.fsync(self._f.fileno())
        self._text.close()   # closes the binary file and releases the lock

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedWriter:
    """ResultWriter's interface over a family of shards of at most `shard_rows` rows each
    (results.csv -> results.00000.csv, ...): resume reads every shard (each cut as ResultWriter
    cuts a file) and appends new rows to new shards; a path is never written twice across them."""

    def __init__(self, path: str | os.PathLike, classes: Sequence[str], branches: Sequence[str], *,
                 shard_rows: int, resume: bool = False, overwrite: bool = False):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.path = Path(path)
        self.fmt = check_target(self.path, resume=resume, overwrite=overwrite, shard_rows=shard_rows)
        self.classes, self.branches, self.shard_rows = list(classes), list(branches), shard_rows
        shards = shard_paths(self.path)
        if overwrite and not resume:
            for p in shards:
                p.unlink()
            shards = []
        self.existing: list[dict[str, Any]] = []
        for p in shards:
            with ResultWriter(p, classes, branches, resume=True) as w:
                self.existing += w.existing
        self.done: set[str] = set()
        for r in self.existing:
            if r["path"] in self.done:
                raise OutputError(f"{self.path}: {r['path']!r} has rows in two shards; remove one")
            self.done.add(r["path"])
        self.shards = shards
        self._next = int(re.search(r"\.(\d+)\.[^.]+$", shards[-1].name).group(1)) + 1 if shards else 0
        self._current: ResultWriter | None = None
        self.written = 0

    def write(self, row: dict[str, Any]) -> None:
        """Append one row to the current shard, starting the next one when it is full."""
        key = row["path"]
        if key in self.done:
            raise OutputError(f"{self.path}: {key!r} already has a row")
        if self._current is None or self._current.written >= self.shard_rows:
            self._rotate()
        self._current.write(row)
        self.done.add(key)
        self.written += 1

    def _rotate(self) -> None:
        if self._current is not None:
            self._current.close()
        path = shard_path(self.path, self._next)
        self._current = ResultWriter(path, self.classes, self.branches)
        self.shards.append(path)
        self._next += 1

    def flush(self) -> None:
        if self._current is not None:
            self._current.flush()

    def close(self) -> None:
        if self._current is not None:
            self._current.close()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_writer(path: str | os.PathLike, classes: Sequence[str], branches: Sequence[str], *, resume: bool = False,
                overwrite: bool = False, shard_rows: int = 0) -> ResultWriter | ShardedWriter:
    """The writer of --out: one file, or shards of `shard_rows` rows when that is > 0."""
    if shard_rows:
        return ShardedWriter(path, classes, branches, shard_rows=shard_rows, resume=resume, overwrite=overwrite)
    return ResultWriter(path, classes, branches, resume=resume, overwrite=overwrite)


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete row of a results file (typed values), e.g. to compare two runs; for a sharded
    --out (no file of that name, shards beside it), the rows of every shard in order."""
    path = Path(path)
    if not path.exists() and (shards := shard_paths(path)):
        return [row for p in shards for row in read_results(p)]
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: not a .csv or .jsonl results file")
    data = path.read_bytes()
    if fmt == "csv":
        records, _ = _split_csv_records(data)
        if not records:
            return []
        columns = next(csv.reader(io.StringIO(records[0].decode())))
    else:
        first = data.split(b"\n", 1)[0]
        columns = list(json.loads(first)) if first.strip() else []
    rows, _, _ = _parse_existing(data, fmt, columns, path)
    return rows


__all__ = ["ResultWriter", "ShardedWriter", "OutputError", "columns_for", "prediction_row", "error_row",
           "result_row", "open_writer", "read_results", "shard_paths", "check_target", "FORMATS"]
