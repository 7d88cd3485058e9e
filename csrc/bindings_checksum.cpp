// The checksums in blob2gpu._core: crc32c() and Sha256 over any object with the buffer protocol
// (bytes, bytearray, memoryview, numpy arrays, mmap), read in place, without a copy.
#include <pybind11/pybind11.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>

#include "bindings_gil.hpp"
#include "checksum.hpp"
#include "file_digest.hpp"

namespace py = pybind11;
using blob2gpu::BlockingCall;
using blob2gpu::Md5;
using blob2gpu::Sha256;

namespace {

// Below this size the GIL is kept: releasing and retaking it costs more than checksumming the
// bytes, and under contention retaking it can wait a whole switch interval (5 ms).
constexpr size_t kReleaseGilBytes = 64 * 1024;

// A C-contiguous, read-only view of an object's buffer, released when it goes out of scope. The
// exporter cannot resize or free the memory while the view is held, so the GIL may be dropped.
class BufferView {
 public:
  explicit BufferView(py::handle obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~BufferView() { PyBuffer_Release(&view_); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;

  const void* data() const { return view_.buf; }
  size_t size() const { return static_cast<size_t>(view_.len); }
  bool worth_releasing_gil() const { return size() >= kReleaseGilBytes; }

 private:
  Py_buffer view_{};
};

template <uint32_t (*Crc)(const void*, size_t, uint32_t)>
uint32_t crc_of_buffer(py::handle data, uint32_t crc) {
  BufferView view(data);
  if (!view.worth_releasing_gil()) return Crc(view.data(), view.size(), crc);
  BlockingCall blocking;
  return Crc(view.data(), view.size(), crc);
}

// Sha256 as Python sees it: update() runs without the GIL, so a mutex keeps two threads that
// share one object from feeding it at the same time (hashlib objects behave the same).
class PySha256 {
 public:
  explicit PySha256(bool portable) : sha_(!portable) {}

  void update(py::handle data) {
    BufferView view(data);
    if (!view.worth_releasing_gil()) {
      auto lock = lock_state();
      sha_.update(view.data(), view.size());
      return;
    }
    BlockingCall blocking;
    std::lock_guard<std::mutex> lock(mutex_);
    sha_.update(view.data(), view.size());
  }

  Sha256::Digest digest() {
    auto lock = lock_state();
    return sha_.finish();
  }

  std::string hexdigest() {
    auto lock = lock_state();
    return sha_.hex();
  }

  bool uses_hardware() const { return sha_.uses_hardware(); }

 private:
  // Called with the GIL held: waits for another thread's update() without blocking Python.
  std::unique_lock<std::mutex> lock_state() {
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock()) {
      BlockingCall blocking;
      lock.lock();
    }
    return lock;
  }

  std::mutex mutex_;
  Sha256 sha_;
};

}  // namespace

void register_checksum_bindings(py::module_& m) {
  m.def("crc32c", &crc_of_buffer<blob2gpu::crc32c>, py::arg("data"), py::arg("crc") = 0,
        "CRC32C (Castagnoli, as Azure Storage and the crc32c package compute it) of a buffer, "
        "read in place. crc is the CRC of the bytes before it: crc32c(b, crc32c(a)) == "
        "crc32c(a + b). Returns an int in [0, 2**32). Raises TypeError for objects without the "
        "buffer protocol and BufferError (or ValueError) for non-contiguous ones.");
  m.def("crc32c_portable", &crc_of_buffer<blob2gpu::crc32c_portable>, py::arg("data"),
        py::arg("crc") = 0,
        "crc32c() computed by the table-driven code whatever the CPU (the reference the hardware "
        "path is tested against).");
  m.def("crc32c_combine", &blob2gpu::crc32c_combine, py::arg("crc_a"), py::arg("crc_b"),
        py::arg("len_b"),
        "crc32c(a + b) from crc32c(a), crc32c(b) and len(b): CRCs of chunks checked apart add up "
        "to the CRC of the whole.");
  m.def("crc32c_hardware", &blob2gpu::crc32c_hardware_available,
        "True when crc32c() runs on CRC instructions (SSE4.2, ARMv8 CRC).");
  m.def("sha256_hardware", &blob2gpu::sha256_hardware_available,
        "True when Sha256 runs on SHA instructions (SHA-NI) unless built with portable=True.");

  m.def(
      "md5",
      [](py::handle data) {
        BufferView view(data);
        Md5 md5;
        if (view.worth_releasing_gil()) {
          BlockingCall blocking;
          md5.update(view.data(), view.size());
        } else {
          md5.update(view.data(), view.size());
        }
        const Md5::Digest d = md5.finish();
        return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
      },
      py::arg("data"), "The 16-byte MD5 of a buffer (the core's, as Content-MD5 checks use it).");

  m.def(
      "hash_file",
      [](int fd, uint64_t chunk_bytes, bool sha256, bool md5) {
        if (chunk_bytes == 0) throw py::value_error("chunk_bytes must be positive");
        blob2gpu::FileDigest d;
        {
          BlockingCall blocking;  // reads the whole file: one return of the GIL for all of it
          d = blob2gpu::digest_file(fd, chunk_bytes, sha256, md5);
        }
        if (d.error != 0) {
          errno = d.error;
          PyErr_SetFromErrno(PyExc_OSError);
          throw py::error_already_set();
        }
        py::object sha = d.sha256_hex ? py::object(py::str(*d.sha256_hex)) : py::none();
        py::object digest_md5 =
            d.md5
                ? py::object(py::bytes(reinterpret_cast<const char*>(d.md5->data()), d.md5->size()))
                : py::none();
        py::list crcs;
        for (uint32_t crc : d.chunk_crc32c) crcs.append(crc);
        return py::make_tuple(d.size, crcs, sha, digest_md5);
      },
      py::arg("fd"), py::arg("chunk_bytes"), py::kw_only(), py::arg("sha256") = false,
      py::arg("md5") = false,
      "(size, [CRC32C per chunk_bytes], SHA-256 hex or None, MD5 bytes or None) of the open file "
      "fd, read from offset 0 to its end (pread: its offset does not move) by the core in one "
      "call without the GIL. Raises OSError for a failed read, ValueError for chunk_bytes 0.");

  m.def(
      "copied",
      [](py::handle data) {
        BufferView view(data);
        PyObject* raw =
            PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(view.size()));
        if (raw == nullptr) throw py::error_already_set();
        py::object out = py::reinterpret_steal<py::object>(raw);
        char* into = PyByteArray_AS_STRING(raw);
        if (view.worth_releasing_gil()) {
          BlockingCall blocking;  // the copy touches fresh pages: kernel work, not the GIL's
          std::memcpy(into, view.data(), view.size());
        } else {
          std::memcpy(into, view.data(), view.size());
        }
        return out;
      },
      py::arg("data"),
      "A bytearray holding a copy of a buffer's bytes, copied without the GIL (bytes(view) "
      "holds it for the whole copy); e.g. a staging slot's range kept for the NVMe cache's "
      "writer after the slot is reused.");

  py::class_<PySha256>(m, "Sha256",
                       "Incremental SHA-256 over buffers, like hashlib.sha256; update() reads "
                       "the buffer in place and releases the GIL for large ones.")
      .def(py::init([](py::object data, bool portable) {
             auto sha = std::make_unique<PySha256>(portable);
             if (!data.is_none()) sha->update(data);
             return sha;
           }),
           py::arg("data") = py::none(), py::kw_only(), py::arg("portable") = false,
           "Start a digest, fed first with data when given. portable=True forces the portable "
           "code even on CPUs with SHA instructions.")
      .def("update", &PySha256::update, py::arg("data"),
           "Feed the bytes of a buffer. Returns None; raises TypeError for objects without the "
           "buffer protocol.")
      .def(
          "digest",
          [](PySha256& self) {
            const Sha256::Digest d = self.digest();
            return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
          },
          "The 32-byte digest of the bytes fed so far; update() may go on afterwards.")
      .def("hexdigest", &PySha256::hexdigest, "digest() as 64 lowercase hex digits.")
      .def_property_readonly("hardware", &PySha256::uses_hardware,
                             "Whether this object runs on SHA instructions.")
      .def_property_readonly_static("name", [](py::object) { return "sha256"; })
      .def_property_readonly_static("digest_size", [](py::object) { return Sha256::kDigestBytes; })
      .def_property_readonly_static("block_size", [](py::object) { return Sha256::kBlockBytes; });
}
