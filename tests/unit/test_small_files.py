"""The core's small file reads (csrc/small_files.*): what the control plane reads of the node's
disk (an index, a manifest, /proc and cgroup files, the shards' sizes), a batch per call. Input
that may be anything: a FIFO must not block, a device must not be read, a file over the limit is
not kept, and a name C would cut short at a NUL is refused rather than read as another file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from blob2gpu import _core
from blob2gpu.documents import read_regular_file
from blob2gpu.errors import ConfigError, InvalidIndex, SourceReadError, SourceUnavailable
from blob2gpu.sources.local import LocalRangeReader, resolve_local
from blob2gpu.sources.plan import ShardRef


def test_a_batch_reads_each_regular_file_and_says_why_not_for_the_others(tmp_path):
    small = tmp_path / "small.json"
    small.write_bytes(b'{"a": 1}')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    files = _core.read_small_files(
        [str(small), str(tmp_path / "missing"), str(tmp_path), str(fifo), "/dev/zero"], 1024
    )
    read, missing, directory, pipe, device = files
    assert (read.data, read.error, read.regular, read.size, read.over_limit) == (
        b'{"a": 1}',
        0,
        True,
        8,
        False,
    )
    assert missing.error == errno.ENOENT and missing.data == b""
    for other in (directory, pipe, device):  # opened (a FIFO without waiting), never read
        assert (other.error, other.regular, other.data) == (0, False, b"")


def test_the_limit_is_inclusive_and_nothing_over_it_is_kept(tmp_path):
    exact, over = tmp_path / "exact", tmp_path / "over"
    exact.write_bytes(b"x" * 100)
    over.write_bytes(b"x" * 101)
    at, past = _core.read_small_files([str(exact), str(over)], 100)
    assert (at.data, at.over_limit) == (b"x" * 100, False)
    assert (past.data, past.over_limit, past.size) == (b"", True, 101)


def test_proc_files_whose_size_says_zero_are_read_whole():
    (meminfo,) = _core.read_small_files(["/proc/meminfo"], 1 << 20)
    assert meminfo.size == 0 and meminfo.regular
    assert b"MemAvailable:" in meminfo.data and meminfo.data.endswith(b"\n")
    (clipped,) = _core.read_small_files(["/proc/meminfo"], 16)
    assert (clipped.data, clipped.over_limit) == (b"", True)


def test_a_name_with_a_nul_is_refused_not_cut_short(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(b"secret")
    (read,) = _core.read_small_files([f"{real}\0.json"], 1024)
    (kind,) = _core.stat_paths([f"{real}\0.json"])
    assert (read.error, read.data) == (errno.EINVAL, b"")
    assert (kind.error, kind.regular) == (errno.EINVAL, False)


def test_stat_follows_symlinks_unless_told_not_to(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"12345")
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    paths = [str(target), str(link), str(tmp_path), str(dangling)]
    followed = _core.stat_paths(paths)
    assert [(k.error, k.regular, k.directory, k.size) for k in followed[:3]] == [
        (0, True, False, 5),
        (0, True, False, 5),
        (0, False, True, followed[2].size),
    ]
    assert followed[3].error == errno.ENOENT
    not_followed = _core.stat_paths(paths, follow_symlinks=False)
    assert not_followed[1].error == 0 and not not_followed[1].regular
    assert not_followed[3].error == 0  # the link itself is there


def test_read_regular_file_keeps_its_typed_errors(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_regular_file(fifo, 1024, ConfigError, "config file")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (2 << 20))
    with pytest.raises(InvalidIndex, match="larger than 1 MiB"):
        read_regular_file(big, 1 << 20, InvalidIndex, "index")
    with pytest.raises(ConfigError, match="cannot read config file .*No such file"):
        read_regular_file(tmp_path / "absent", 1024, ConfigError, "config file")
    assert read_regular_file(Path(big), 4 << 20, InvalidIndex, "index") == b" " * (2 << 20)


def test_a_shard_range_is_read_into_the_caller_s_buffer_or_raises_typed_errors(tmp_path):
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(bytes(range(256)) * 4)
    into = bytearray(100)
    _core.read_shard_range(str(shard), "model.safetensors", 10, into)
    assert into == bytes(range(10, 110))
    with pytest.raises(SourceReadError, match="ended at offset 1024") as ended:
        _core.read_shard_range(str(shard), "model.safetensors", 1000, into)
    assert ended.value.shard == "model.safetensors"
    with pytest.raises(SourceUnavailable, match="No such file"):
        _core.read_shard_range(str(tmp_path / "gone"), "gone", 0, into)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SourceUnavailable, match="not a readable regular file"):
        _core.read_shard_range(str(fifo), "fifo", 0, into)  # refused, never waited on
    with pytest.raises(BufferError):
        _core.read_shard_range(str(shard), "model.safetensors", 0, b"read-only")


def test_a_local_part_is_read_by_the_core(tmp_path):
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"x" * 64)
    reader = LocalRangeReader()
    view = memoryview(bytearray(32))
    reader.read_into(ShardRef(name=shard.name, path=str(shard), size=64), 16, view)
    assert bytes(view) == b"x" * 32
    with pytest.raises(SourceReadError, match="ended at offset 64"):
        reader.read_into(ShardRef(name=shard.name, path=str(shard), size=80), 48, view)


def test_names_that_are_not_utf8_are_still_names(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9.safetensors"
    with open(name, "wb") as f:
        f.write(b"12345")
    as_str = os.fsdecode(name)  # what os.listdir gives back: lone surrogates
    (kind,) = _core.stat_paths([os.fsencode(as_str)])
    (read,) = _core.read_small_files([os.fsencode(as_str)], 16)
    assert (kind.regular, kind.size, read.data) == (True, 5, b"12345")
    assert read_regular_file(as_str, 16, ConfigError, "config file") == b"12345"
    plan = resolve_local(str(tmp_path))  # a directory of shards, one of them so named
    assert [(ref.path, ref.size) for ref in plan.shards] == [(as_str, 5)]


def test_names_relative_to_a_directory_descriptor_never_through_a_symlink(tmp_path):
    (tmp_path / "record.json").write_bytes(b"{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "record.json")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        record, link = _core.read_small_files(
            ["record.json", "link.json"], 64, follow_symlinks=False, dir_fd=fd
        )
    finally:
        os.close(fd)
    assert (record.error, record.data) == (0, b"{}")
    assert (link.error, link.data) == (errno.ELOOP, b"")


def test_a_batch_keeps_open_only_regular_files_of_their_size_and_touches_those(tmp_path):
    # The cache's hits: each data file opened never through a symlink, kept only as a regular
    # file of its recorded size, and its record touched for LRU only when it was kept.
    for name in ("good", "short", "good.rec", "short.rec"):
        (tmp_path / name).write_bytes(b"x" * 8)
    old = 1_000_000_000
    for name in ("good.rec", "short.rec"):
        os.utime(tmp_path / name, (old, old))
    (tmp_path / "link").symlink_to(tmp_path / "good")
    os.mkfifo(tmp_path / "fifo")
    names = ["good", "short", "link", "fifo", "missing", "good\0x", "any"]
    (tmp_path / "any").write_bytes(b"y" * 3)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        files = _core.open_regular_files(
            names, [8, 9, 8, 8, 8, 8, -1], touch=["good.rec", "short.rec"], dir_fd=dir_fd
        )
        good, short, link, fifo, missing, nul, any_size = files
        assert good.fd >= 0 and os.pread(good.fd, 8, 0) == b"x" * 8
        assert (good.regular, good.size, good.uid, good.mode & 0o777) == (
            True,
            8,
            os.geteuid(),
            (tmp_path / "good").stat().st_mode & 0o777,
        )
        assert (short.fd, short.error, short.regular, short.size) == (-1, 0, True, 8)
        assert (link.fd, link.error) == (-1, errno.ELOOP)
        assert (fifo.fd, fifo.error, fifo.regular) == (-1, 0, False)  # opened without waiting
        assert (missing.fd, missing.error) == (-1, errno.ENOENT)
        assert (nul.fd, nul.error) == (-1, errno.EINVAL)
        assert any_size.fd >= 0 and any_size.size == 3
        assert (tmp_path / "good.rec").stat().st_mtime > old  # touched: its file was kept
        assert (tmp_path / "short.rec").stat().st_mtime == old  # not: its file was refused
        os.close(good.fd)
        os.close(any_size.fd)
        assert len(os.listdir("/proc/self/fd")) == fds_before  # nothing refused was left open
    finally:
        os.close(dir_fd)
