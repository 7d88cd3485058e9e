// The control plane's small file reads in blob2gpu._core (csrc/small_files.*): a batch of them
// gives the GIL up once, however many files and system calls it takes.
#include <fcntl.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings_gil.hpp"
#include "shard_file.hpp"
#include "small_files.hpp"

namespace py = pybind11;
using namespace blob2gpu;

void register_file_bindings(py::module_& m) {
  py::class_<SmallFile>(m, "SmallFile")
      .def_property_readonly("data", [](const SmallFile& f) { return py::bytes(f.data); })
      .def_readonly("error", &SmallFile::error,
                    "errno of open, fstat or read; 0 when they succeeded.")
      .def_readonly("regular", &SmallFile::regular)
      .def_readonly("size", &SmallFile::size, "st_size when opened.")
      .def_readonly("over_limit", &SmallFile::over_limit,
                    "Its size, or what was read of it, was over the limit (nothing kept).");

  py::class_<PathKind>(m, "PathKind")
      .def_readonly("error", &PathKind::error, "errno of stat; 0 when it succeeded.")
      .def_readonly("regular", &PathKind::regular)
      .def_readonly("directory", &PathKind::directory)
      .def_readonly("size", &PathKind::size);

  m.def(
      "read_small_files",
      [](const std::vector<std::string>& paths, uint64_t limit, bool follow_symlinks,
         std::optional<int> dir_fd) {
        BlockingCall blocking;  // every open, stat and read of the batch: one return of the GIL
        return read_small_files(paths, limit, follow_symlinks, dir_fd.value_or(AT_FDCWD));
      },
      py::arg("paths"), py::arg("limit"), py::kw_only(), py::arg("follow_symlinks") = true,
      py::arg("dir_fd") = py::none(),
      "A SmallFile for each path (a FIFO does not block; with follow_symlinks=False a symlink is "
      "not opened: ELOOP): the bytes of a regular file of at most `limit` bytes, else why not "
      "(error, regular, over_limit); relative paths from dir_fd when given (openat). One call "
      "without the GIL for the whole batch.");

  py::class_<OpenedFile>(m, "OpenedFile")
      .def_readonly("fd", &OpenedFile::fd,
                    "The descriptor kept open (the caller closes it); -1 when not kept.")
      .def_readonly("error", &OpenedFile::error, "errno of open or fstat; 0 when they succeeded.")
      .def_readonly("regular", &OpenedFile::regular)
      .def_readonly("size", &OpenedFile::size, "st_size.")
      .def_readonly("uid", &OpenedFile::uid, "st_uid.")
      .def_readonly("mode", &OpenedFile::mode, "st_mode.");

  m.def(
      "open_regular_files",
      [](const std::vector<std::string>& names, const std::vector<int64_t>& sizes,
         const std::vector<std::string>& touch, int dir_fd) {
        BlockingCall blocking;  // every open, fstat and touch of the batch: one return of the GIL
        return open_regular_files(names, sizes, touch, dir_fd);
      },
      py::arg("names"), py::arg("sizes"), py::kw_only(), py::arg("touch"), py::arg("dir_fd"),
      "An OpenedFile for each name, opened from dir_fd never through a symlink (ELOOP) and kept "
      "open only as a regular file of sizes[i] bytes (< 0: any); a kept file's touch[i] (when "
      "not empty) has its modification time set to now. One call without the GIL for the batch.");

  m.def(
      "stat_paths",
      [](const std::vector<std::string>& paths, bool follow_symlinks) {
        BlockingCall blocking;
        return stat_paths(paths, follow_symlinks);
      },
      py::arg("paths"), py::kw_only(), py::arg("follow_symlinks") = true,
      "A PathKind for each path (stat, or lstat with follow_symlinks=False: a symlink is then "
      "neither regular nor a directory), in one call without the GIL.");

  m.def(
      "read_shard_range",
      [](const std::string& path, const std::string& shard, uint64_t offset, py::buffer into) {
        py::buffer_info view = into.request(/*writable=*/true);
        if (view.ndim != 1 || view.itemsize != 1 || view.strides[0] != 1) {
          throw py::value_error("read_shard_range needs a contiguous buffer of bytes");
        }
        BlockingCall blocking;  // the buffer stays exported, so it cannot move meanwhile
        ShardFile file(path, shard);
        file.read_exact(static_cast<uint8_t*>(view.ptr), static_cast<size_t>(view.size), offset);
      },
      py::arg("path"), py::arg("shard"), py::arg("offset"), py::arg("into"),
      "Read bytes [offset, offset + len(into)) of the shard file at `path` into `into`, in one "
      "call without the GIL. Raises SourceUnavailable (cannot open it, not a regular file) or "
      "SourceReadError (a failed read, or the file ended first) naming the shard and offset.");
}
