"""pipeline.input.members: every tar member belongs to one sample row or is a row itself, and a tar
that cannot be read to its end fails the shard, whatever its compression or name."""

from __future__ import annotations

import io
import tarfile
import tracemalloc

import numpy as np
import pytest

from pipeline.errors import ShardError
from pipeline.input.members import Member, check_key, group_members, printable, split_name
from pipeline.input.reader import iter_samples
from tests.support.shards import png
from tests.support.tars import COMPRESS, Entry, tar_bytes, write_tar

GUIDE = png(np.full((8, 8, 3), 200, np.uint8))


def _rows(url, **options):
    return [(s.key, s.error_kind) for s in iter_samples(url, None, None, None, **options)]


def test_names_split_as_webdataset_does_and_keep_leading_dots():
    assert split_name("a.png") == ("a", "png")
    assert split_name("a.MASK.PNG") == ("a", "mask.png")
    assert split_name("dir/a.b.png") == ("dir/a", "b.png")
    assert split_name(".hidden.png") == (".hidden", "png")
    assert split_name("m..extra.png") == ("m", ".extra.png")
    assert split_name("td.") == ("td", "")
    for name in ("README", ".png", "..png", "a/", ""):
        assert split_name(name) == (None, None), name


def test_printable_escapes_what_cannot_be_written():
    assert printable("caf\udce9") == "caf\\xe9"
    assert printable("a\nb\x07") == "a\\nb\\x07"
    assert printable("日本 ok") == "日本 ok"
    assert check_key("caf\udce9") == ("key 'caf\\xe9' is not valid UTF-8 (its other bytes are "
                                      "shown as \\xNN); allowed: printable UTF-8 keys")
    assert "control characters" in check_key("a\nb")
    assert check_key("日本") is None


def test_members_without_a_key_are_rows_and_do_not_split_the_sample_around_them():
    names = ["a.png", "README", "a.json", "b.png"]
    raws = list(group_members(Member(n, n.encode()) for n in names))
    assert [(r.key, r.keyless, sorted(r.members)) for r in raws] == [
        ("a", False, ["json", "png"]), ("README", True, []), ("b", False, ["png"])]


CASES = {
    # name: (tar entries beside a good sample "good", the rows expected after it)
    "not UTF-8 (latin-1 name)": ([Entry(b"caf\xe9.png", GUIDE)], [("caf\\xe9", "key")]),
    "key starting with a dot": ([Entry(".hidden.png", GUIDE)], [(".hidden", "key")]),
    "control character": ([Entry("a\nb.png", GUIDE)], [("a\\nb", "key")]),
    "no extension": ([Entry("README", b"x")], [("README", "member")]),
    "only an extension": ([Entry(".png", GUIDE)], [(".png", "member")]),
    "empty extension": ([Entry("td.", b"x"), Entry("td.png", GUIDE)], [("td", "member")]),
    "_ extension": ([Entry("td._x", b"x"), Entry("td.png", GUIDE)], [("td", "member")]),
    "__key__ extension": ([Entry("td.png", GUIDE), Entry("td.__key__", b"evil")],
                          [("td", "member")]),
    "empty extension part": ([Entry("m.png", GUIDE), Entry("m..extra.png", GUIDE)],
                             [("m", "member")]),
    "extension not UTF-8": ([Entry("m.png", GUIDE), Entry(b"m.\xff", b"x")],
                            [("m", "member")]),
    "symlink": ([Entry("s.png", kind="symlink", link="good.png")], [("s", "member")]),
    "hard link": ([Entry("h.png", kind="hardlink", link="good.png")], [("h", "member")]),
    "fifo beside a guide": ([Entry("f.png", GUIDE), Entry("f.cls", kind="fifo")],
                            [("f", "member")]),
    "dotted image names": ([Entry("img.v2.png", GUIDE), Entry("img.v3.png", GUIDE)],
                           [("img", "missing")]),
    "directory entry": ([Entry("d", kind="dir")], []),
    "extension case": ([Entry("good.PNG", GUIDE)], [("good", "duplicate")]),
    "unicode key": ([Entry("日本.png", GUIDE)], [("日本", None)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_member_is_a_row_and_no_sample_fails_the_shard(tmp_path, case):
    entries, expected = CASES[case]
    url = write_tar(tmp_path / "t.tar", [Entry("good.png", GUIDE), *entries])
    assert _rows(url) == [("good", None), *expected]


def test_rows_name_the_member_and_what_is_allowed(tmp_path):
    entries = [e for case in ("symlink", "empty extension part", "dotted image names",
                              "no extension") for e in CASES[case][0]]
    url = write_tar(tmp_path / "t.tar", entries)
    errors = {s.key: s.error for s in iter_samples(url, None, None, None)}
    assert errors["s"] == ("member 's.png' is a symbolic link to 'good.png'; allowed: regular "
                           "files (links are not followed)")
    assert "member 'm..extra.png': its extension '.extra.png' has an empty part" in errors["m"]
    assert "img.v2.png, img.v3.png belong to sample img as extensions" in errors["img"]
    assert "member 'README' belongs to no sample" in errors["README"]


def test_a_member_over_the_limit_is_never_read_into_memory(tmp_path):
    url = write_tar(tmp_path / "t.tar", [Entry("big.bin", bytes(8 * 2**20)),
                                         Entry("big.png", GUIDE)])
    tracemalloc.start()
    try:
        assert _rows(url, max_member_bytes=2**20) == [("big", "size")]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak  # the 8 MiB member was skipped in the stream, not held


def test_a_member_over_the_limit_is_a_size_row_and_is_not_read(tmp_path):
    url = write_tar(tmp_path / "t.tar", [Entry("big.png", b"x" * 5000), Entry("big.txt", b"t"),
                                         Entry("good.png", GUIDE)])
    samples = list(iter_samples(url, None, None, None, max_member_bytes=4096))
    assert [(s.key, s.error_kind) for s in samples] == [("big", "size"), ("good", None)]
    assert "member 'big.png' is 5,000 bytes; allowed: at most 4,096" in samples[0].error
    # the members of one sample together: at most 4 x the member limit
    url = write_tar(tmp_path / "u.tar", [Entry(f"many.{i}.bin", b"x" * 4000) for i in range(5)])
    assert _rows(url, max_member_bytes=4096) == [("many", "size")]


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz"])
def test_compressed_tars_are_read_by_content_whatever_their_name(tmp_path, compression):
    """A gzip tar named .tar was refused as truncated (its compressed size compared with the
    uncompressed offset)."""
    entries = [Entry("a.png", GUIDE), Entry("b.png", GUIDE)]
    for name in ("shard.tar", "shard.tar.gz", "shard"):
        url = write_tar(tmp_path / name, entries, compression)
        assert _rows(url) == [("a", None), ("b", None)], name


@pytest.mark.parametrize("compression", ["none", "gzip", "bzip2", "xz"])
@pytest.mark.parametrize("name", ["cut.tar", "cut.tar.gz"])
def test_an_inner_tar_cut_at_a_member_boundary_fails_the_shard_for_every_compression(
        tmp_path, compression, name):
    """A .tar.gz whose inner tar was cut was committed as complete, while the same plain .tar
    was refused."""
    whole = tar_bytes([Entry("a.png", GUIDE), Entry("b.png", GUIDE)])
    second = whole.index(b"b.png")  # the second member's header starts here
    path = tmp_path / name
    path.write_bytes(COMPRESS[compression](whole[:second]))
    with pytest.raises(ShardError, match="truncated tar: it ends at byte 1,024"):
        _rows(str(path))


def test_a_cut_compressed_stream_fails_the_shard(tmp_path):
    whole = COMPRESS["gzip"](tar_bytes([Entry("a.png", GUIDE)]))
    (tmp_path / "c.tar.gz").write_bytes(whole[:-4])  # the inner tar is whole, the gzip is not
    with pytest.raises(ShardError, match="cannot read: EOFError: Compressed file ended"):
        _rows(str(tmp_path / "c.tar.gz"))


def test_unreadable_tars_fail_the_shard_naming_why(tmp_path):
    whole = tar_bytes([Entry("a.png", GUIDE), Entry("b.png", GUIDE), Entry("c.png", GUIDE)])
    cases = {
        "empty": (b"", "the file is empty"),
        "zstd": (b"\x28\xb5\x2f\xfd" + b"\0" * 600, "a zstd file; allowed: a tar, plain or "
                                                     "compressed with gzip, bzip2 or xz"),
        "zip": (b"PK\x03\x04" + b"\0" * 600, "a zip file; allowed: a tar"),
        "garbage": (b"hello world" * 100, "not a tar: its first bytes"),
        "cut in a header": (whole[: whole.index(b"b.png") + 100], "ends inside the member "
                                                                  "header"),
        "appended tar": (whole + tar_bytes([Entry("d.png", GUIDE)]),
                         "data after the end-of-archive block"),
    }
    corrupt = bytearray(whole)
    corrupt[whole.index(b"b.png")] ^= 0x01  # a bit flip in the second header's name
    cases["corrupt header"] = (bytes(corrupt), "the member header at byte 1,024 of its tar "
                                               "data is invalid")
    for case, (data, message) in cases.items():
        path = tmp_path / "x.tar"
        path.write_bytes(data)
        with pytest.raises(ShardError, match=r"x\.tar: cannot read: ") as info:
            _rows(str(path))
        assert message in str(info.value), case


def test_an_empty_archive_has_no_samples(tmp_path):
    buffer = io.BytesIO()
    tarfile.open(fileobj=buffer, mode="w").close()
    (tmp_path / "e.tar").write_bytes(buffer.getvalue())
    assert _rows(str(tmp_path / "e.tar")) == []
