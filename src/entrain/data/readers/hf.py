"""Hugging Face data sets, read with pyarrow alone (no `datasets` library):

- parquet files (`*.parquet` in a folder, or one file), as the Hub serves them;
- a `datasets.save_to_disk` folder (`dataset_info.json`, `state.json`, `data-*.arrow`
  Arrow IPC streams).

Columns come from the options. An image or audio cell may be bytes, a `{"bytes", "path"}`
dict (how the Image and Audio features store them), a path string, or a list of these;
paths are relative to `image_root` (default: the data set's folder). Files are read in
batches of rows, and only the columns used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from entrain.data.readers.common import (
    ItemRef,
    RawSample,
    ReaderError,
    ReaderOptions,
    as_id,
    conversation_of,
    conversation_text,
    record_label,
)

USES = frozenset({"image_root", "text_column", "image_column", "audio_column", "id_column"})
ABOUT = "Hugging Face data set: parquet files, or a save_to_disk folder of Arrow files"
ROWS_PER_BATCH = 64  # rows may hold image bytes: keep a batch to tens of MB


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ValueError(
            "reading Hugging Face data sets needs pyarrow: pip install entrain[data]"
        ) from None
    return pyarrow


def read(path: Path, options: ReaderOptions, notes: list[str]) -> Iterator[RawSample | ReaderError]:
    pa = _pyarrow()
    files = _data_files(path)
    root = (
        Path(options.image_root) if options.image_root else (path if path.is_dir() else path.parent)
    )
    wanted = {
        "text": options.text_column,
        "image": options.image_column,
        "audio": options.audio_column,
    }
    row = 0  # across files, for ids when there is no id column
    for f in files:
        batches = _parquet_batches(pa, f) if f.suffix == ".parquet" else _arrow_batches(pa, f)
        schema = next(batches)
        cols = _columns(f, schema.names, wanted, options, notes, first=f == files[0])
        in_file = 0
        for batch in batches:
            for cells in batch.select(list(cols.values())).to_pylist():
                yield _sample(f, in_file, row, _by_role(cells, cols), cols, root)
                in_file += 1
                row += 1


def _data_files(path: Path) -> list[Path]:
    """The data files in reading order."""
    if path.is_file():
        if path.suffix not in (".parquet", ".arrow"):
            raise ReaderError(path, None, None, "expected a folder, a .parquet or an .arrow file")
        return [path]
    if not path.is_dir():
        raise ReaderError(path, None, None, "no such file or folder")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise ReaderError(
            path, None, None, f"a DatasetDict: give one split's folder ({', '.join(splits)})"
        )
    if (path / "state.json").is_file():  # save_to_disk: state.json lists the files in order
        try:
            state = json.loads((path / "state.json").read_text())
            files = [path / d["filename"] for d in state["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ReaderError(
                path / "state.json", None, "_data_files", f"unreadable ({e})"
            ) from None
        return files
    files = sorted(path.glob("*.parquet")) or sorted(path.glob("**/*.parquet"))
    files = files or sorted(path.glob("*.arrow"))
    if not files:
        raise ReaderError(path, None, None, "no *.parquet files, and not a save_to_disk folder")
    return files


def _parquet_batches(pa, f: Path):
    """The schema, then record batches."""
    try:
        pf = pa.parquet.ParquetFile(f)
    except (OSError, pa.ArrowException) as e:
        raise ReaderError(f, None, None, f"not a readable parquet file ({e})") from None
    yield pf.schema_arrow
    try:
        yield from pf.iter_batches(batch_size=ROWS_PER_BATCH)
    except (OSError, pa.ArrowException) as e:
        raise ReaderError(f, None, None, f"unreadable parquet data ({e})") from None


def _arrow_batches(pa, f: Path):
    """The schema, then record batches of an Arrow IPC stream (what `save_to_disk` writes)
    or, failing that, an Arrow IPC file."""
    try:
        source = pa.memory_map(str(f))
    except (OSError, pa.ArrowException) as e:
        raise ReaderError(f, None, None, f"cannot open ({e})") from None
    with source:
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            try:
                source.seek(0)
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as e:
                raise ReaderError(f, None, None, f"not an Arrow stream or file ({e})") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield reader.schema
        try:
            yield from batches
        except (OSError, pa.ArrowException) as e:
            raise ReaderError(f, None, None, f"unreadable Arrow data ({e})") from None


def _columns(
    f: Path, names: list[str], wanted: dict, options: ReaderOptions, notes: list[str], first: bool
) -> dict[str, str]:
    """modality/"text"/"id" -> column name, checked against the file's columns."""
    cols = {k: v for k, v in wanted.items() if v is not None}
    for k, col in cols.items():
        if col not in names:
            raise ReaderError(
                f, None, f"column '{col}'", f"no such column (--{k}-column); has {', '.join(names)}"
            )
    if options.id_column in names:
        cols["id"] = options.id_column
    elif options.id_column != "id":
        raise ReaderError(f, None, f"column '{options.id_column}'", "no such column (--id-column)")
    elif first:
        notes.append("no 'id' column: ids are row numbers")
    if first:
        for m in ("image", "audio"):
            unused = [n for n in names if n in (m, m + "s") and wanted[m] is None]
            if unused:
                notes.append(f"column '{unused[0]}' was not read (no --{m}-column given)")
    return cols


def _by_role(cells: dict, cols: dict[str, str]) -> dict:
    """A row's cells keyed by role ("text", "image", ...) rather than column name."""
    return {role: cells[col] for role, col in cols.items()}


def _sample(
    f: Path, i: int, row: int, cells: dict, cols: dict, root: Path
) -> RawSample | ReaderError:
    """Row `i` of file `f`; `row` counts rows across files (the id without an id column)."""
    sid = as_id(cells["id"]) if "id" in cols else str(row)
    where = record_label("row", i, sid)
    if sid is None:
        return ReaderError(f, where, f"column '{cols['id']}'", f"unusable id {_show(cells['id'])}")
    text = conversation_text(cells["text"])
    if text is None:
        return ReaderError(
            f,
            where,
            f"column '{cols['text']}'",
            f"expected text or conversation turns, got {_show(cells['text'])}",
        )
    sample = RawSample(source=str(f), record=where, id=sid, text=text)
    try:
        for m in ("image", "audio"):
            if m in cols:
                setattr(sample, m, _items(sample, cells[m], cols[m], root))
        sample.messages = conversation_of(sample, cells["text"])
    except ReaderError as e:
        return e
    return sample


def _items(sample: RawSample, cell: object, col: str, root: Path) -> list[ItemRef]:
    """The items of one cell: None, one item, or a list of items."""
    if cell is None:
        return []
    many = isinstance(cell, list)
    refs = []
    for k, c in enumerate(cell if many else [cell]):
        fld = f"column '{col}'" + (f"[{k}]" if many else "")
        if isinstance(c, bytes | bytearray):
            refs.append(ItemRef(field=fld, data=bytes(c)))
        elif isinstance(c, dict) and c.get("bytes") is not None:
            name = c.get("path") or ""
            fld += f" ({name!r})" if name else ""
            refs.append(
                ItemRef(field=fld, data=bytes(c["bytes"]), suffix=Path(name).suffix.lower())
            )
        elif isinstance(c, dict) and isinstance(c.get("path"), str) and c["path"]:
            refs.append(ItemRef(field=f"{fld} ({c['path']!r})", path=root / c["path"]))
        elif isinstance(c, str) and c:
            refs.append(ItemRef(field=f"{fld} ({c!r})", path=root / c))
        elif isinstance(c, dict) and "array" in c:
            raise sample.error(fld, "decoded audio arrays are not supported (store bytes or paths)")
        else:
            raise sample.error(
                fld, f"expected bytes, {{'bytes', 'path'}} or a path, got {_show(c)}"
            )
    return refs


def _show(v: object, width: int = 40) -> str:
    """A cell for an error message, cut short (a cell may hold megabytes)."""
    text = repr(v)
    return text if len(text) <= width else text[: width - 3] + "..."
