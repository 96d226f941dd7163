"""The JSON Lines manifest (docs/design.md section 4): round trips, streaming, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrain.workload import (
    MODALITIES,
    MODALITY_FIELDS,
    ManifestError,
    ManifestReader,
    Workload,
    iter_batches,
    read_manifest,
    write_manifest,
)
from entrain.workload.traces import GENERATORS, generate_workload

# Which modalities each synthetic trace kind must produce (so a round trip is never vacuous).
KIND_MODALITIES = {
    "llava-pretrain": ("image",),
    "llava-instruct": ("image",),
    "interleaved": ("image",),
    "omni": ("image", "audio"),
    "video": ("image", "video"),
}

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------------- helpers


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def assert_same_workload(a: Workload, b: Workload, *, lines: bool = True) -> None:
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.text_tokens, b.text_tokens)
    assert a.text_tokens.dtype == np.int64 and b.text_tokens.dtype == np.int64
    if lines:
        np.testing.assert_array_equal(a.line, b.line)
    for m in MODALITIES:
        ta, tb = a.items[m], b.items[m]
        assert ta.size.shape == (len(ta), len(MODALITY_FIELDS[m]))
        assert tb.size.shape == (len(tb), len(MODALITY_FIELDS[m]))
        np.testing.assert_array_equal(ta.sample, tb.sample, err_msg=f"{m} sample index")
        np.testing.assert_array_equal(ta.size, tb.size, err_msg=f"{m} sizes")


def items_of(w: Workload, modality: str, s: int) -> list[list[float]]:
    """Sizes of the items of sample s, in order."""
    t = w.items[modality]
    return t.size[t.sample == s].tolist()


# --------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_round_trip_every_generator(tmp_path, kind):
    assert set(GENERATORS) == set(KIND_MODALITIES), "a new generator needs an entry here"
    w = generate_workload(kind, 257, seed=3)
    for m in KIND_MODALITIES[kind]:
        assert len(w.items[m]) > 0, f"{kind} should produce {m} items"
    path = tmp_path / f"{kind}.jsonl"
    assert write_manifest(path, w) == 257
    assert not (tmp_path / f"{kind}.jsonl.tmp").exists()
    assert len(path.read_text(encoding="utf-8").splitlines()) == 257
    back = read_manifest(path)
    assert_same_workload(w, back)
    np.testing.assert_array_equal(back.line, np.arange(1, 258))
    assert back.to_records() == w.to_records()


def test_generate_is_deterministic_and_seed_dependent():
    a = generate_workload("omni", 100, seed=5)
    b = generate_workload("omni", 100, seed=5)
    c = generate_workload("omni", 100, seed=6)
    assert a.to_records() == b.to_records()
    assert a.to_records() != c.to_records()


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """A small and a large (several reader chunks) manifest with their in-memory workloads."""
    d = tmp_path_factory.mktemp("manifests")
    out = {}
    for kind, n in (("interleaved", 300), ("omni", 9000)):
        w = generate_workload(kind, n, seed=11)
        path = d / f"{kind}-{n}.jsonl"
        write_manifest(path, w)
        out[n] = (path, w)
    return out


@pytest.mark.parametrize(
    "n, batch_size",
    [
        (300, 1),
        (300, 7),
        (300, 64),
        (300, 300),
        (300, 1000),
        (9000, 1000),
        (9000, 4096),
        (9000, 5000),
        (9000, 9000),
    ],
)
def test_iter_batches(manifests, n, batch_size):
    path, whole = manifests[n]
    batches = list(iter_batches(path, batch_size))
    sizes = [len(b) for b in batches]
    assert all(s == batch_size for s in sizes[:-1])
    assert 0 < sizes[-1] <= batch_size
    assert sum(sizes) == n
    assert len(batches) == -(-n // batch_size)
    start = 0
    for b in batches:
        stop = start + len(b)
        # item sample indices are local to the batch
        for m in MODALITIES:
            t = b.items[m]
            assert np.all((t.sample >= 0) & (t.sample < len(b)))
            assert np.all(np.diff(t.sample) >= 0)
        assert_same_workload(b, whole.slice(start, stop))
        start = stop
    assert_same_workload(Workload.concat(batches), whole)


def test_iter_batches_progress_and_bad_size(manifests):
    path, _ = manifests[300]
    seen = []
    assert len(list(iter_batches(path, 50, on_progress=seen.append))) == 6
    assert sum(seen) == 300
    with pytest.raises(ValueError):
        next(iter_batches(path, 0))


@pytest.mark.parametrize("n", [300, 9000])
def test_streaming_chunk_size_does_not_matter(manifests, n):
    path, whole = manifests[n]
    small = list(ManifestReader(path, chunk_size=7 if n == 300 else 1000))
    k = 7 if n == 300 else 1000
    assert [len(c) for c in small[:-1]] == [k] * (len(small) - 1)
    assert 0 < len(small[-1]) <= k
    for c in small:
        for m in MODALITIES:
            assert np.all(c.items[m].sample < len(c))
    big = list(ManifestReader(path, chunk_size=10**6))
    assert len(big) == 1
    assert_same_workload(Workload.concat(small), big[0])
    assert_same_workload(big[0], whole)


def test_streaming_duplicate_across_chunks(tmp_path):
    lines = [json.dumps({"id": f"s{i}", "text_tokens": i}) for i in range(30)]
    lines.append(json.dumps({"id": "s3", "text_tokens": 1}))
    path = write_lines(tmp_path / "dup.jsonl", lines)
    with pytest.raises(ManifestError) as e:
        list(ManifestReader(path, chunk_size=7))
    assert e.value.line == 31
    assert "line 4" in str(e.value)


# -------------------------------------------------------------------------------- bad input

GOOD = '{"id": "ok0", "text_tokens": 5, "image": [[336, 336]]}'

BAD_LINES = [
    # (bad line, field, substring of the message)
    ('{"text_tokens": 3}', "id", "missing"),
    ('{"id": "", "text_tokens": 3}', "id", "non-empty"),
    ('{"id": 7, "text_tokens": 3}', "id", "string"),
    ('{"id": "b"}', "text_tokens", "missing"),
    ('{"id": "b", "text_tokens": -1}', "text_tokens", "-1"),
    ('{"id": "b", "text_tokens": true}', "text_tokens", "true"),
    ('{"id": "b", "text_tokens": 2.5}', "text_tokens", "2.5"),
    ('{"id": "b", "text_tokens": "12"}', "text_tokens", "12"),
    ('{"id": "b", "text_tokens": 3, "image": [[336, -1]]}', "image[0]", "width"),
    ('{"id": "b", "text_tokens": 3, "image": [[0, 336]]}', "image[0]", "height"),
    ('{"id": "b", "text_tokens": 3, "image": [[336]]}', "image[0]", "[height, width]"),
    ('{"id": "b", "text_tokens": 3, "image": [[336, 336], [1, 2, 3]]}', "image[1]", "width"),
    ('{"id": "b", "text_tokens": 3, "image": [[336.5, 336]]}', "image[0]", "integer"),
    ('{"id": "b", "text_tokens": 3, "image": [[true, 336]]}', "image[0]", "integer"),
    ('{"id": "b", "text_tokens": 3, "image": [336, 336]}', "image[0]", "[height, width]"),
    ('{"id": "b", "text_tokens": 3, "image": {"h": 3}}', "image", "list"),
    ('{"id": "b", "text_tokens": 3, "image": {}}', "image", "list"),
    ('{"id": "b", "text_tokens": 3, "image": 0}', "image", "list"),
    ('{"id": "b", "text_tokens": 3, "audio": false}', "audio", "list"),
    ('{"id": "b", "text_tokens": 3, "video": ""}', "video", "list"),
    ('{"id": "b", "text_tokens": 3, "audio": [0]}', "audio[0]", "> 0"),
    ('{"id": "b", "text_tokens": 3, "audio": [4.5, -2.5]}', "audio[1]", "> 0"),
    ('{"id": "b", "text_tokens": 3, "audio": ["4.5"]}', "audio[0]", "number"),
    ('{"id": "b", "text_tokens": 3, "audio": [NaN]}', "audio[0]", "number"),
    ('{"id": "b", "text_tokens": 3, "audio": [Infinity]}', "audio[0]", "number"),
    ('{"id": "b", "text_tokens": 3, "video": [[16, 448]]}', "video[0]", "[frames, height, width]"),
    ('{"id": "b", "text_tokens": 3, "video": [[0, 448, 448]]}', "video[0]", "frames"),
]


@pytest.mark.parametrize("bad, field, why", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_field_names_file_line_and_field(tmp_path, bad, field, why):
    # two good lines, a blank one, then the bad line: it is line 4
    path = write_lines(tmp_path / "m.jsonl", [GOOD, GOOD.replace("ok0", "ok1"), "", bad])
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    msg = str(e.value)
    assert str(path) in msg
    assert f"{path}:4:" in msg
    assert f"'{field}'" in msg
    assert why in msg
    assert (e.value.line, e.value.field, e.value.path) == (4, field, str(path))


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"id": "a", "text_tokens": 3', "not valid JSON"),
        ("{'id': 'a', 'text_tokens': 3}", "not valid JSON"),
        ("hello", "not valid JSON"),
        ('[{"id": "a", "text_tokens": 3}]', "JSON object"),
        ('"a string"', "JSON object"),
        ("null", "JSON object"),
        ("17", "JSON object"),
    ],
)
def test_not_a_json_object(tmp_path, bad, why):
    path = write_lines(tmp_path / "m.jsonl", [GOOD, "", "   ", bad, GOOD.replace("ok0", "ok9")])
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert f"{path}:4:" in str(e.value)
    assert why in str(e.value)
    assert e.value.line == 4


def test_duplicate_id_names_both_lines(tmp_path):
    lines = [
        '{"id": "a", "text_tokens": 1}',
        '{"id": "b", "text_tokens": 2}',
        "",
        '{"id": "c", "text_tokens": 3}',
        '{"id": "b", "text_tokens": 9, "image": [[28, 28]]}',
    ]
    path = write_lines(tmp_path / "dup.jsonl", lines)
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    msg = str(e.value)
    assert f"{path}:5:" in msg
    assert "'id'" in msg
    assert '"b"' in msg
    assert "line 2" in msg
    assert e.value.line == 5


def test_hash_collisions_are_not_duplicates(tmp_path, monkeypatch):
    """Only id hashes are kept; a collision is checked against the file before it is reported."""
    import entrain.workload.manifest as manifest

    monkeypatch.setattr(manifest, "hash", lambda s: 42, raising=False)  # every id collides
    lines = [json.dumps({"id": f"s{i}", "text_tokens": i}) for i in range(5)]
    path = write_lines(tmp_path / "m.jsonl", [lines[0], "", *lines[1:]])
    assert read_manifest(path).ids == [f"s{i}" for i in range(5)]
    write_lines(path, [*lines, "", lines[2]])
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert e.value.line == 7
    assert "line 3" in str(e.value)


def test_ids_equal_up_to_case_or_space_are_not_duplicates(tmp_path):
    lines = [json.dumps({"id": i, "text_tokens": 1}) for i in ("a", "A", "a ", " a")]
    w = read_manifest(write_lines(tmp_path / "m.jsonl", lines))
    assert w.ids == ["a", "A", "a ", " a"]


@pytest.mark.parametrize("content", ["", "\n", "\n\n   \n\t\n", "\r\n\r\n"])
def test_no_samples(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert str(path) in str(e.value)
    assert "no samples" in str(e.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert str(path) in str(e.value)
    assert "not found" in str(e.value)
    with pytest.raises(ManifestError):
        next(iter_batches(path, 4))


def test_invalid_utf8_is_a_manifest_error(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"id": "a", "text_tokens": 1}\n\xff\xfe{"id"\n')
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert "UTF-8" in str(e.value)
    assert str(path) in str(e.value)


def test_invalid_utf8_names_the_right_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    good = "".join(json.dumps({"id": f"s{i}", "text_tokens": 1}) + "\n" for i in range(10))
    path.write_bytes(good.encode() + b"\xff\xfe\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert e.value.line == 11


def test_blank_lines_unknown_keys_and_nulls(tmp_path):
    lines = [
        "",
        '{"id": "a", "text_tokens": 0, "caption": "x", "meta": {"k": [1, 2]}, "image": null}',
        "   ",
        "\t",
        '{"id": "b", "text_tokens": 4, "image": [], "audio": null, "video": null, "extra": [1]}',
        '{"id": "c", "text_tokens": 2, "image": [[10, 20], [30, 40]], "audio": [1, 2.5]}',
        "",
    ]
    w = read_manifest(write_lines(tmp_path / "m.jsonl", lines))
    assert len(w) == 3
    assert w.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(w.line, [2, 5, 6])
    np.testing.assert_array_equal(w.text_tokens, [0, 4, 2])
    np.testing.assert_array_equal(w.item_count("image"), [0, 0, 2])
    np.testing.assert_array_equal(w.item_count("audio"), [0, 0, 2])
    np.testing.assert_array_equal(w.item_count("video"), [0, 0, 0])
    assert items_of(w, "image", 2) == [[10.0, 20.0], [30.0, 40.0]]
    assert items_of(w, "audio", 2) == [[1.0], [2.5]]


# ------------------------------------------------ limits of JSON and of the numeric types


@pytest.mark.parametrize(
    "line",
    [
        '{"id": "a", "text_tokens": 100000000000000000000}',
        '{"id": "a", "text_tokens": 1, "image": [[' + "9" * 400 + ", 3]]}",
        '{"id": "a", "text_tokens": 1, "audio": [' + "9" * 400 + "]}",
    ],
    ids=["text_tokens>int64", "image side>float", "audio>float"],
)
def test_huge_integers_are_manifest_errors(tmp_path, line):
    with pytest.raises(ManifestError):
        read_manifest(write_lines(tmp_path / "m.jsonl", [line]))


@pytest.mark.parametrize("junk", ["\x0c", "\x1c", "\u3000", "\x85"], ids=repr)
def test_non_json_whitespace_line_is_not_blank(tmp_path, junk):
    path = write_lines(tmp_path / "m.jsonl", [GOOD, junk, GOOD.replace("ok0", "ok1")])
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert e.value.line == 2


@pytest.mark.parametrize(
    "line",
    ['{"id": "a", "text_tokens": ' + "1" * 5000 + "}", "[" * 100_000],
    ids=["int over 4300 digits", "deep nesting"],
)
def test_json_parser_limits_are_manifest_errors(tmp_path, line):
    with pytest.raises(ManifestError):
        read_manifest(write_lines(tmp_path / "m.jsonl", [line]))


# ----------------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def read_or_manifest_error(path: Path) -> Workload | None:
    """Read `path`; a ManifestError is fine, any other exception fails the test."""
    try:
        return read_manifest(path)
    except ManifestError as e:
        assert str(path) in str(e)
        return None


@FUZZ
@given(lines=st.lists(st.text(max_size=40), max_size=6))
def test_fuzz_text_lines(fuzz_dir, lines):
    path = fuzz_dir / "text.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    read_or_manifest_error(path)


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_bytes(fuzz_dir, data):
    path = fuzz_dir / "bytes.jsonl"
    path.write_bytes(data)
    read_or_manifest_error(path)


# Integers are kept within +-2**62: larger ones hit the OverflowError bug tested above.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**62), 2**62)
    | st.integers(-3, 400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """`good` about nine times in ten, else `bad`."""
    return st.integers(0, 9).flatmap(lambda k: bad if k == 9 else good)


small_int = st.integers(-1, 2000)
item_like = st.lists(
    st.one_of(
        st.lists(small_int, min_size=2, max_size=2),
        st.lists(small_int, min_size=3, max_size=3),
        st.lists(small_int | json_scalars, max_size=4),
        st.floats(allow_nan=True) | st.integers(-5, 100),
        json_values,
    ),
    max_size=3,
)
# Mostly almost-valid records, so that validation gets past 'id' and reaches every field.
record_like = st.fixed_dictionaries(
    {
        "id": mostly(st.text(min_size=1, max_size=6), st.just("") | json_values),
        "text_tokens": mostly(st.integers(0, 10**6), st.just(-1) | json_values),
    },
    optional={
        "image": st.none() | item_like | json_values,
        "audio": st.none() | item_like | json_values,
        "video": st.none() | item_like | json_values,
        "junk": json_values,
    },
)
any_line = mostly(
    record_like, st.dictionaries(st.text(max_size=8), json_values, max_size=5) | json_values
)


@FUZZ
@given(records=st.lists(any_line, max_size=6))
def test_fuzz_json_records(fuzz_dir, records):
    path = fuzz_dir / "json.jsonl"
    write_lines(path, [json.dumps(r) for r in records])
    w = read_or_manifest_error(path)
    if w is not None:  # success means every line became a sample, nothing dropped
        assert w.ids == [r["id"] for r in records]
        np.testing.assert_array_equal(w.text_tokens, [r["text_tokens"] for r in records])


pos = st.integers(1, 100_000)
valid_record = st.fixed_dictionaries(
    {"text_tokens": st.integers(0, 2**40)},
    optional={
        "image": st.none() | st.lists(st.tuples(pos, pos).map(list), max_size=4),
        "audio": st.none()
        | st.lists(
            st.floats(min_value=1e-6, max_value=1e6, allow_nan=False) | st.integers(1, 10**6),
            max_size=3,
        ),
        "video": st.none() | st.lists(st.tuples(pos, pos, pos).map(list), max_size=2),
        "caption": json_values,
    },
)


@FUZZ
@given(
    ids=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=12, unique=True),
    recs=st.lists(valid_record, min_size=12, max_size=12),
    blank_after=st.sets(st.integers(0, 11)),
    ascii_only=st.booleans(),
    chunk_size=st.integers(1, 5),
)
def test_fuzz_valid_records_match_columns(fuzz_dir, ids, recs, blank_after, ascii_only, chunk_size):
    records = [dict(r, id=i) for i, r in zip(ids, recs)]
    lines, expected_line = [], []
    for k, r in enumerate(records):
        lines.append(json.dumps(r, ensure_ascii=ascii_only))
        expected_line.append(len(lines))
        if k in blank_after:
            lines.append("")
    path = write_lines(fuzz_dir / "valid.jsonl", lines)

    for w in (read_manifest(path), Workload.concat(list(ManifestReader(path, chunk_size)))):
        assert w.ids == ids
        np.testing.assert_array_equal(w.text_tokens, [r["text_tokens"] for r in records])
        np.testing.assert_array_equal(w.line, expected_line)
        for m, fields in MODALITY_FIELDS.items():
            exp_sample, exp_size = [], []
            for s, r in enumerate(records):
                for item in r.get(m) or []:
                    exp_sample.append(s)
                    exp_size.append(item if isinstance(item, list) else [item])
            t = w.items[m]
            np.testing.assert_array_equal(t.sample, np.asarray(exp_sample, dtype=np.int64))
            np.testing.assert_array_equal(
                t.size, np.asarray(exp_size, dtype=np.float64).reshape(-1, len(fields))
            )


# ------------------------------------------------------------------ slice / take / concat


@pytest.fixture(scope="module")
def omni():
    w = generate_workload("omni", 200, seed=2)
    assert all(len(w.items[m]) for m in ("image", "audio"))
    return w


def test_slice_concat(omni):
    n = len(omni)
    for cuts in ([0, n], [0, 1, n], [0, 37, 38, 150, n], [0, 0, 100, n, n]):
        parts = [omni.slice(a, b) for a, b in zip(cuts, cuts[1:])]
        assert [len(p) for p in parts] == [b - a for a, b in zip(cuts, cuts[1:])]
        assert_same_workload(Workload.concat(parts), omni)
    s = omni.slice(40, 90)
    assert s.to_records() == omni.to_records()[40:90]
    for m in MODALITIES:
        np.testing.assert_array_equal(s.item_count(m), omni.item_count(m)[40:90])
    np.testing.assert_array_equal(s.line, omni.line[40:90])
    assert len(Workload.concat([])) == 0


def test_take_permutation_and_subset(omni):
    n = len(omni)
    perm = np.random.default_rng(0).permutation(n)
    t = omni.take(perm)
    assert t.ids == [omni.ids[i] for i in perm]
    np.testing.assert_array_equal(t.text_tokens, omni.text_tokens[perm])
    np.testing.assert_array_equal(t.line, omni.line[perm])
    for m in MODALITIES:
        np.testing.assert_array_equal(t.item_count(m), omni.item_count(m)[perm])
        assert np.all(np.diff(t.items[m].sample) >= 0)
    recs = omni.to_records()
    assert t.to_records() == [recs[i] for i in perm]
    assert_same_workload(t.take(np.argsort(perm)), omni)
    assert_same_workload(omni.take(np.arange(n)), omni)

    subset = np.array([150, 3, 77, 4])
    u = omni.take(subset)
    assert len(u) == 4
    assert u.to_records() == [recs[i] for i in subset]
    assert sum(len(u.items[m]) for m in MODALITIES) == sum(
        int(omni.item_count(m)[subset].sum()) for m in MODALITIES
    )
