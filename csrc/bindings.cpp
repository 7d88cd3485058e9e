// The Python module blob2gpu._core: thin bindings over the pipeline. A call that can block gives
// the GIL up and one that cannot keeps it (bindings_gil.hpp); CoreError becomes the
// blob2gpu.errors class named after its kind.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <optional>
#include <unordered_set>

#include "bindings_gil.hpp"
#include "cuda_device.hpp"
#include "device_arena.hpp"
#include "dlpack.hpp"
#include "dtype.hpp"
#include "errors.hpp"
#include "host_buffer.hpp"
#include "load_session.hpp"
#include "safetensors_header.hpp"
#include "shim/cuda_driver.hpp"
#include "teardown_failures.hpp"
#include "tensor_export.hpp"

void register_checksum_bindings(pybind11::module_& m);  // csrc/bindings_checksum.cpp
void register_struct_bindings(pybind11::module_& m);    // csrc/bindings_structs.cpp
void register_http_bindings(pybind11::module_& m);      // csrc/bindings_http.cpp
void register_file_bindings(pybind11::module_& m);      // csrc/bindings_files.cpp

namespace py = pybind11;
using namespace blob2gpu;

namespace {

// Headers up to this size are parsed without giving the GIL up (a fraction of a millisecond).
constexpr size_t kParseWithGilBytes = 1 << 20;

constexpr const char* kCapsuleVersioned = "dltensor_versioned";
constexpr const char* kCapsuleVersionedUsed = "used_dltensor_versioned";
constexpr const char* kCapsuleLegacy = "dltensor";
constexpr const char* kCapsuleLegacyUsed = "used_dltensor";

// A LoadPipeline made on a thread of the core's own, so that a load prepares meanwhile (pinning
// the staging ring takes a while) without starting a Python thread, whose start alone hands the
// GIL back and forth. result() waits for it without the GIL, as often as asked.
class PipelineBeingMade {
 public:
  using Made = std::shared_future<std::shared_ptr<LoadPipeline>>;

  PipelineBeingMade(std::string device, PipelineSettings settings)
      : owner_pid_(getpid()),
        made_(std::make_unique<Made>(
            std::async(std::launch::async, [device = std::move(device), settings] {
              return LoadPipeline::create(device, settings);
            }).share())) {}
  PipelineBeingMade(const PipelineBeingMade&) = delete;
  PipelineBeingMade& operator=(const PipelineBeingMade&) = delete;

  // Dropped: waits for the thread, and closes a pipeline nobody took, without the GIL. In a
  // forked child the thread is the parent's: its state is leaked, never waited for.
  ~PipelineBeingMade() {
    if (getpid() != owner_pid_) {
      static_cast<void>(made_.release());
      return;
    }
    std::unique_ptr<Made> made = std::move(made_);
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      made.reset();
    } else {
      made.reset();
    }
  }

  std::shared_ptr<LoadPipeline> result() {
    if (getpid() != owner_pid_) {
      throw CoreError(ErrorKind::InvalidArgument,
                      "a pipeline being made when the process forked belongs to the parent");
    }
    if (made_->wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
      BlockingCall blocking;
      made_->wait();
    }
    return made_->get();  // rethrows what making it threw
  }

 private:
  pid_t owner_pid_;
  std::unique_ptr<Made> made_;
};

PipelineSettings pipeline_settings(size_t staging_slots, size_t staging_slot_bytes,
                                   size_t copy_streams, size_t io_threads,
                                   bool use_pinned_host_fallback, bool bind_numa_node) {
  PipelineSettings s;
  s.bind_numa_node = bind_numa_node;
  s.staging_slots = staging_slots;
  s.staging_slot_bytes = staging_slot_bytes;
  s.copy_streams = copy_streams;
  s.io_threads = io_threads;
  s.use_pinned_host_fallback = use_pinned_host_fallback;
  return s;
}

// A capsule nobody consumed still owns its tensor: call the deleter.
void versioned_capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, kCapsuleVersionedUsed)) return;
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  auto* managed =
      static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(capsule, kCapsuleVersioned));
  if (managed && managed->deleter) managed->deleter(managed);
  PyErr_Clear();
  PyErr_Restore(type, value, traceback);
}

void legacy_capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, kCapsuleLegacyUsed)) return;
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, kCapsuleLegacy));
  if (managed && managed->deleter) managed->deleter(managed);
  PyErr_Clear();
  PyErr_Restore(type, value, traceback);
}

// The bytes of a one-dimensional, contiguous buffer of bytes (what `what` takes); else
// InvalidArgument.
py::buffer_info contiguous_bytes(const py::buffer& data, const char* what) {
  py::buffer_info info = data.request();
  if (info.ndim != 1 || info.itemsize != 1 || info.strides[0] != 1) {
    throw CoreError(ErrorKind::InvalidArgument,
                    std::string(what) + " takes a contiguous buffer of bytes");
  }
  return info;
}

[[noreturn]] void buffer_error(const std::string& message) {
  PyErr_SetString(PyExc_BufferError, message.c_str());
  throw py::error_already_set();
}

// None -> every tensor; an iterable of names -> those.
std::shared_ptr<const std::unordered_set<std::string>> wanted_names(const py::object& wanted) {
  if (wanted.is_none()) return nullptr;
  auto names = std::make_shared<std::unordered_set<std::string>>();
  for (const py::handle& name : wanted) names->insert(name.cast<std::string>());
  return names;
}

// Resolves the DLPack `stream` argument for a CUDA producer (Python array API semantics).
// Returns false when the consumer asked for no synchronization (-1). Values below -1 name no
// stream: InvalidArgument, never a handle passed to the driver.
bool cuda_stream_from_arg(const py::object& stream, CUstream* out) {
  if (stream.is_none()) {
    *out = BLOB2GPU_CU_STREAM_LEGACY;
    return true;
  }
  if (!py::isinstance<py::int_>(stream)) buffer_error("__dlpack__: stream must be None or an int");
  long long value = 0;
  try {
    value = stream.cast<long long>();
  } catch (const py::cast_error&) {
    throw CoreError(ErrorKind::InvalidArgument, "__dlpack__: stream " +
                                                    py::str(stream).cast<std::string>() +
                                                    " is not a CUDA stream handle");
  }
  if (value == -1) return false;
  if (value < -1) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "__dlpack__: stream " + std::to_string(value) +
                        " is not a CUDA stream: pass -1 (no synchronization), 1 (legacy default "
                        "stream), 2 (per-thread default stream) or a stream handle");
  }
  if (value == 0) {
    buffer_error(
        "__dlpack__: stream=0 is ambiguous for CUDA; pass 1 (legacy default stream), "
        "2 (per-thread default stream) or a stream handle");
  }
  if (value == 1)
    *out = BLOB2GPU_CU_STREAM_LEGACY;
  else if (value == 2)
    *out = BLOB2GPU_CU_STREAM_PER_THREAD;
  else
    *out = reinterpret_cast<CUstream>(static_cast<uintptr_t>(value));
  return true;
}

py::capsule make_capsule(const TensorView& view, bool versioned, uint64_t flags) {
  if (versioned) {
    DLManagedTensorVersioned* m = view.to_dlpack_versioned(flags);
    PyObject* cap = PyCapsule_New(m, kCapsuleVersioned, versioned_capsule_destructor);
    if (cap == nullptr) {
      m->deleter(m);
      throw py::error_already_set();
    }
    return py::reinterpret_steal<py::capsule>(cap);
  }
  DLManagedTensor* m = view.to_dlpack_legacy();
  PyObject* cap = PyCapsule_New(m, kCapsuleLegacy, legacy_capsule_destructor);
  if (cap == nullptr) {
    m->deleter(m);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(cap);
}

py::capsule tensor_dlpack(const std::shared_ptr<TensorView>& self, py::object stream,
                          py::object max_version, py::object dl_device, py::object copy) {
  bool versioned = false;
  if (!max_version.is_none()) {
    auto version = max_version.cast<py::tuple>();
    versioned = version.size() >= 1 && version[0].cast<int>() >= 1;
  }
  auto own = self->dlpack_device();
  std::shared_ptr<TensorView> source = self;
  uint64_t flags = 0;
  bool want_copy = !copy.is_none() && copy.cast<bool>();
  bool forbid_copy = !copy.is_none() && !copy.cast<bool>();
  if (!dl_device.is_none()) {
    auto target = dl_device.cast<py::tuple>();
    int type = target[0].cast<int>(), id = target[1].cast<int>();
    if (type != own.first || id != own.second) {
      if (type != kDLCPU)
        buffer_error("__dlpack__: can only export to this tensor's device or cpu");
      if (forbid_copy) buffer_error("__dlpack__: exporting to cpu needs a copy, and copy=False");
      want_copy = true;
    }
  }
  if (own.first == kDLCUDA && !want_copy) {
    // The consumer's stream is also where its work on the tensor is queued: a streamed load
    // reuses the tensor's memory only after that work (TensorView::note_consumer). Queuing the
    // wait does not block: the GIL is kept.
    CUstream consumer = nullptr;
    if (cuda_stream_from_arg(stream, &consumer)) {
      self->make_stream_wait(consumer);
      self->note_consumer(consumer);
    } else {
      self->note_consumer(nullptr);
    }
  }
  if (want_copy) {
    if (own.first == kDLCUDA &&
        (dl_device.is_none() || dl_device.cast<py::tuple>()[0].cast<int>() == kDLCUDA)) {
      buffer_error(
          "__dlpack__: copy=True on the same CUDA device is not supported; copy in the "
          "consumer instead");
    }
    if (!versioned) buffer_error("__dlpack__: a copy needs a DLPack 1.0+ consumer (max_version)");
    BlockingCall blocking;  // a device-to-host copy
    source = self->to_host();
    flags |= kDLPackFlagIsCopied;
  }
  return make_capsule(*source, versioned, flags);
}

// A landing held by Python: gives its slot back if dropped without commit() or release().
struct PyLanding {
  std::shared_ptr<LoadSession> session;
  Landing landing;
  bool open = true;
  ~PyLanding() {
    if (open && session) session->release(landing);
  }
  void check_open() const {
    if (!open) throw CoreError(ErrorKind::InvalidArgument, "this landing was already committed");
  }
};

ErrorKind error_kind_from_name(const std::string& name) {
  for (int k = 0; k <= static_cast<int>(ErrorKind::LoadCancelled); ++k) {  // LoadCancelled: last
    if (name == error_kind_name(static_cast<ErrorKind>(k))) return static_cast<ErrorKind>(k);
  }
  throw CoreError(ErrorKind::InvalidArgument, "unknown error kind '" + name + "'");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "blob2gpu native core: safetensors header parsing, staging ring, copy engine, arenas";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CoreError& e) {
      py::object errors = py::module_::import("blob2gpu.errors");
      py::object cls = errors.attr(error_kind_name(e.kind()));
      py::object shard = e.shard().empty() ? py::none() : py::cast(e.shard());
      py::object offset = e.offset() < 0 ? py::none() : py::cast(e.offset());
      py::object hint = e.hint().empty() ? py::none() : py::cast(e.hint());
      py::object error = e.kind() == ErrorKind::CudaDriverUnavailable && e.code() >= 0
                             ? cls(e.what(), py::arg("shard") = shard, py::arg("offset") = offset,
                                   py::arg("hint") = hint,
                                   py::arg("driver_status") = static_cast<DriverStatus>(e.code()))
                             : cls(e.what(), py::arg("shard") = shard, py::arg("offset") = offset,
                                   py::arg("hint") = hint);
      PyErr_SetObject(cls.ptr(), error.ptr());
    }
  });

  // The longest header the core accepts: a caller that reads headers itself reads no further.
  m.attr("MAX_HEADER_BYTES") = py::int_(kMaxHeaderBytes);
  m.def(
      "parse_header",
      [](py::bytes data, py::object file_size, const std::string& shard) {
        std::string_view bytes = data;
        uint64_t size = file_size.is_none() ? bytes.size() : file_size.cast<uint64_t>();
        auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
        ShardHeader h;
        {
          // Parsing is CPU work, not a wait: only a large header is worth a return of the GIL.
          std::optional<BlockingCall> blocking;
          if (bytes.size() > kParseWithGilBytes) blocking.emplace();
          uint64_t n = read_header_length(p, bytes.size(), size, shard);
          if (bytes.size() < kHeaderLengthBytes + n) {
            throw CoreError(ErrorKind::HeaderTruncated, "shard '" + shard + "': only " +
                                                            std::to_string(bytes.size()) +
                                                            " bytes given, the header needs " +
                                                            std::to_string(kHeaderLengthBytes + n));
          }
          h = parse_header(p + kHeaderLengthBytes, n, size, shard);
        }
        py::list tensors;
        for (const auto& t : h.tensors) {
          py::dict d;
          d["name"] = t.name;
          d["dtype"] = std::string(dtype_info(t.dtype).name);
          d["shape"] = py::tuple(py::cast(t.shape));
          d["begin"] = t.begin;
          d["end"] = t.end;
          tensors.append(d);
        }
        py::dict metadata;
        for (const auto& kv : h.metadata) metadata[py::str(kv.first)] = kv.second;
        py::dict out;
        out["header_bytes"] = h.header_bytes;
        out["data_offset"] = h.data_offset;
        out["data_bytes"] = h.data_bytes;
        out["tensors"] = tensors;
        out["metadata"] = metadata;
        return out;
      },
      py::arg("data"), py::arg("file_size") = py::none(), py::arg("shard") = "shard",
      "Parse and validate a safetensors header from the first bytes of a shard.");

  m.def("dtype_table", [] {
    py::list out;
    for (const auto& info : dtype_table()) {
      py::dict d;
      d["name"] = std::string(info.name);
      d["bits"] = info.bits;
      d["dlpack_code"] = info.dlpack_code;
      d["dlpack_bits"] = info.dlpack_bits;
      out.append(d);
    }
    return out;
  });

  py::enum_<DriverStatus>(m, "DriverStatus",
                          "What loading the CUDA driver came to (driver_info()['status'], "
                          "CudaDriverUnavailable.driver_status).")
      .value("LOADED", DriverStatus::Loaded)
      .value("NOT_FOUND", DriverStatus::NotFound)
      .value("MISSING_ENTRY_POINT", DriverStatus::MissingEntryPoint)
      .value("INIT_FAILED", DriverStatus::InitFailed)
      .value("NO_DEVICE", DriverStatus::NoDevice);

  m.def("driver_info", [] {
    py::dict d;
    DriverLoad load = driver_load();
    d["status"] = load.status;
    d["path"] = load.path;
    d["detail"] = load.detail;
    try {
      const CudaDriver& drv = cuda_driver();
      d["available"] = true;
      d["path"] = drv.path;
      d["version"] = drv.version;
      int count = 0;
      check_cuda(drv.cuDeviceGetCount(&count), "cuDeviceGetCount");
      py::list devices;
      for (int i = 0; i < count; ++i) {
        CUdevice dev = 0;
        check_cuda(drv.cuDeviceGet(&dev, i), "cuDeviceGet");
        char name[256] = {0};
        drv.cuDeviceGetName(name, sizeof(name) - 1, dev);
        size_t total = 0;
        drv.cuDeviceTotalMem(&total, dev);
        py::dict info;
        info["index"] = i;
        info["name"] = std::string(name);
        info["total_bytes"] = total;
        devices.append(info);
      }
      d["devices"] = devices;
    } catch (const CoreError& e) {
      d["available"] = false;
      d["error"] = std::string(e.what());
      if (e.code() >= 0) d["status"] = static_cast<DriverStatus>(e.code());
    }
    return d;
  });

  m.def(
      "device_memory",
      [](int ordinal) {
        BlockingCall blocking;
        auto ctx = CudaContext::probe(ordinal);
        auto info = ctx->memory_info();
        return std::make_tuple(info.first, info.second, ctx->name());
      },
      py::arg("ordinal"),
      "(free bytes, total bytes, name) of GPU `ordinal` (cuMemGetInfo on its primary context). "
      "Raises CudaDriverUnavailable or InvalidArgument.");

  m.def(
      "pinned_probe",
      [](int ordinal, size_t bytes) {
        BlockingCall blocking;
        auto ctx = CudaContext::probe(ordinal);
        return static_cast<bool>(HostBuffer::pinned(ctx, bytes));
      },
      py::arg("ordinal"), py::arg("bytes"),
      "Whether `bytes` of host memory can be pinned now (allocated with cuMemHostAlloc and freed "
      "at once): False when the driver has no memory left to page-lock; raises CudaError for "
      "any other driver error.");

  m.def("current_device", &current_device_ordinal,
        "Ordinal of the GPU whose CUDA context is current on the calling thread, or -1 when none "
        "is (or no driver loads). Never raises.");

  m.def("teardown_failures", &teardown_failures,
        "Driver calls that failed while blob2gpu objects were torn down (destructors, DLPack "
        "deleters, exit) in this process: counted, the first printed to stderr, never raised.");

  m.def(
      "gil_reacquisitions", [] { return gil_reacquisitions(); },
      "How many times the calling thread has taken the GIL back after a _core call gave it up "
      "(only a call that can block does: csrc/bindings_gil.hpp), since the thread started. "
      "Tests bound how often handing tensors out returns to the interpreter's lock.");

  m.def("live_arena_count", &DeviceArena::live_count,
        "Arenas (shard and realigned-tensor allocations) alive in this process.");

  py::class_<TensorView, std::shared_ptr<TensorView>>(m, "TensorView")
      .def_property_readonly("name", &TensorView::name)
      .def_property_readonly(
          "dtype", [](const TensorView& t) { return std::string(dtype_info(t.dtype()).name); })
      .def_property_readonly("shape",
                             [](const TensorView& t) { return py::tuple(py::cast(t.shape())); })
      .def_property_readonly("nbytes", &TensorView::nbytes)
      .def_property_readonly("data_ptr", &TensorView::address)
      .def_property_readonly("device",
                             [](const TensorView& t) {
                               auto d = t.dlpack_device();
                               return d.first == kDLCUDA ? "cuda:" + std::to_string(d.second)
                                                         : std::string("cpu");
                             })
      .def("__dlpack_device__",
           [](const TensorView& t) {
             return py::make_tuple(t.dlpack_device().first, t.dlpack_device().second);
           })
      .def("__dlpack__", &tensor_dlpack, py::kw_only(), py::arg("stream") = py::none(),
           py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(),
           py::arg("copy") = py::none())
      .def("as_bytes", &TensorView::as_bytes,
           "A uint8 view of the same bytes (for consumers that lack this dtype).")
      .def("to_host", &TensorView::to_host, py::call_guard<BlockingCall>(),
           "A copy in host memory; waits for the bytes to land first.")
      .def("wait_ready", &TensorView::wait_ready, py::call_guard<BlockingCall>())
      .def("to_bytes",
           [](const TensorView& t) {
             std::shared_ptr<TensorView> host;
             {
               BlockingCall blocking;
               host = t.to_host();
             }
             return py::bytes(reinterpret_cast<const char*>(host->address()), host->nbytes());
           })
      .def("__repr__", [](const TensorView& t) {
        std::string shape;
        for (size_t i = 0; i < t.shape().size(); ++i) {
          shape += (i ? ", " : "") + std::to_string(t.shape()[i]);
        }
        auto d = t.dlpack_device();
        return "TensorView('" + t.name() + "', " + std::string(dtype_info(t.dtype()).name) + "[" +
               shape + "], " + (d.first == kDLCUDA ? "cuda:" + std::to_string(d.second) : "cpu") +
               ")";
      });

  py::class_<PyLanding, std::shared_ptr<PyLanding>>(m, "Landing")
      .def_property_readonly("shard", [](const PyLanding& l) { return l.landing.shard; })
      .def_property_readonly("file_offset",
                             [](const PyLanding& l) { return l.landing.file_offset; })
      .def_property_readonly("nbytes", [](const PyLanding& l) { return l.landing.capacity; })
      .def_property_readonly(
          "view",
          [](const PyLanding& l) {
            l.check_open();
            return py::memoryview::from_memory(static_cast<void*>(l.landing.data),
                                               static_cast<py::ssize_t>(l.landing.capacity),
                                               /*readonly=*/false);
          },
          "A writable memoryview of the landing's bytes; valid until commit() or release().");

  py::class_<LoadSession, std::shared_ptr<LoadSession>>(m, "LoadSession")
      .def(
          "next_shard",
          [](LoadSession& s, bool keep) {
            // What has arrived is handed out with the GIL kept: it is given up (and taken back
            // once) only when the consumer has to wait.
            std::optional<PublishedShard> out;
            if (s.try_next_shard(keep, out)) return out;
            BlockingCall blocking;
            return s.next_shard(keep);
          },
          py::arg("keep") = true,
          "The next PublishedShard (a tensor group: a whole shard unless the load is streamed) "
          "in arrival order, or None when every one was returned. Blocks (without the GIL) only "
          "while none has arrived; raises the load's first error. keep=False: the consumer drops "
          "the tensors as it goes, and a streamed load counts them against its device memory "
          "until they go.")
      .def("take_ready", &LoadSession::take_ready,
           "The PublishedShards published but not yet returned by next_shard(), even after the "
           "load failed.")
      .def(
          "wait_landed",
          [](LoadSession& s) {
            if (s.landed()) return s.wait_landed();  // nothing to wait for: the GIL is kept
            BlockingCall blocking;
            s.wait_landed();
          },
          "Blocks until every byte handed out so far has landed on the device; raises a copy's "
          "error.")
      .def("cancel", &LoadSession::cancel,
           "Stop the load (does not wait: close() does); next_shard() raises LoadCancelled.")
      .def("close", &LoadSession::close, py::call_guard<BlockingCall>())
      .def_property_readonly("shard_count", &LoadSession::shard_count)
      .def(
          "acquire",
          [](const std::shared_ptr<LoadSession>& s, size_t shard, uint64_t file_offset,
             size_t nbytes) -> py::object {
            // The GIL is given up only when the landing must wait (for a staging slot or a
            // streamed group's memory) or have host memory populated.
            std::optional<Landing> landing;
            if (!s->try_acquire(shard, file_offset, nbytes, landing)) {
              BlockingCall blocking;
              landing = s->acquire(shard, file_offset, nbytes);
            }
            if (!landing) return py::none();
            auto out = std::make_shared<PyLanding>();
            out->session = s;
            out->landing = *landing;
            return py::cast(out);
          },
          py::arg("shard"), py::arg("file_offset"), py::arg("nbytes"),
          "A Landing for bytes [file_offset, file_offset + nbytes) of a shard, or None once the "
          "load is cancelled. Blocks (without the GIL) for a free staging slot.")
      .def(
          "commit",
          [](LoadSession& s, PyLanding& l) {
            l.check_open();
            l.open = false;
            BlockingCall blocking;
            return s.commit(l.landing);
          },
          py::arg("landing"),
          "Hand a filled landing to the pipeline; returns its shard's FeedStatus. Raises the "
          "load's typed error for a bad header.")
      .def(
          "release",
          [](LoadSession& s, PyLanding& l) {
            if (!l.open) return;
            l.open = false;
            s.release(l.landing);
          },
          py::arg("landing"), "Give an unfilled landing back (the feeder gave up on it).")
      .def(
          "abort",
          [](LoadSession& s, const std::string& kind, const std::string& message) {
            s.abort(error_kind_from_name(kind), message);
          },
          py::arg("kind"), py::arg("message"),
          "Fail the load with a core error kind; next_shard() raises it.")
      .def("needed_ranges", &LoadSession::needed_ranges, py::arg("shard"),
           "[(begin, end)] file byte ranges of the shard's data that this load reads (all of it, "
           "or a tensor selection's), once commit() reported its header ready.")
      .def("exchangeable", &LoadSession::exchangeable, py::arg("shard"),
           "Whether the shard's data may be exchanged by a group (header ready, fed, no "
           "Content-MD5, not host staging).")
      .def("exchange_steps", &LoadSession::exchange_steps, py::arg("shard"),
           "[(begin, end)] file ranges of the shard's groups' reads, in order.")
      .def(
          "check_fetched",
          [](LoadSession& s, size_t shard, uint64_t file_offset, const py::buffer& data) {
            const py::buffer_info info = contiguous_bytes(data, "check_fetched");
            const auto* p = static_cast<const uint8_t*>(info.ptr);
            const auto n = static_cast<size_t>(info.size);
            BlockingCall blocking;  // checksums over the part's bytes
            s.check_fetched(shard, file_offset, p, n);
          },
          py::arg("shard"), py::arg("file_offset"), py::arg("data"),
          "Check data bytes this process fetched (its part) against the manifest.")
      .def("exchange_checked", &LoadSession::exchange_checked, py::arg("shard"),
           "Every rank checked its part of the shard: its groups' checked bytes count.")
      .def("destinations", &LoadSession::destinations, py::arg("shard"),
           "[(begin, end)] file ranges where the shard's data lands, each in one allocation.")
      .def("open_destinations", &LoadSession::open_destinations, py::call_guard<BlockingCall>(),
           py::arg("shard"), py::arg("begin"), py::arg("end"),
           "Uint8 TensorViews of the destinations of file bytes [begin, end), or None once the "
           "load is cancelled. Blocks (without the GIL) until their groups have memory.")
      .def(
          "land_from_host",
          [](LoadSession& s, size_t shard, uint64_t file_offset, const py::buffer& data) {
            const py::buffer_info info = contiguous_bytes(data, "land_from_host");
            const auto* p = static_cast<const uint8_t*>(info.ptr);
            const auto n = static_cast<size_t>(info.size);
            BlockingCall blocking;  // waits for a staging slot, copies the bytes
            return s.land_from_host(shard, file_offset, p, n);
          },
          py::arg("shard"), py::arg("file_offset"), py::arg("data"),
          "Land data bytes this process fetched into their open destinations; False once the "
          "load is cancelled.")
      .def(
          "order_writes",
          [](LoadSession& s, const py::int_& stream) {
            CUstream handle = nullptr;
            if (!cuda_stream_from_arg(stream, &handle)) return;
            s.order_writes(handle);  // queues stream waits: does not block, the GIL is kept
          },
          py::arg("stream"),
          "Make a communicator's CUDA stream wait for the load's copies. `stream` as DLPack's: "
          "1 the legacy default stream, 2 the per-thread one, a handle, or -1 (none: no-op).")
      .def(
          "arrived",
          [](LoadSession& s, size_t shard, uint64_t begin, uint64_t end, const py::int_& stream,
             bool from_peer) {
            CUstream handle = nullptr;
            std::optional<CUstream> on;
            if (cuda_stream_from_arg(stream, &handle)) on = handle;
            s.arrived(shard, begin, end, on, from_peer);  // records an event: the GIL is kept
          },
          py::arg("shard"), py::arg("begin"), py::arg("end"), py::arg("stream"),
          py::arg("from_peer"),
          "File bytes [begin, end) are in their destinations, written or sent on `stream` (as "
          "order_writes'; -1: done already).")
      .def("stats", &LoadSession::stats, "The load's SessionStats so far.");

  py::class_<PipelineBeingMade>(m, "PipelineBeingMade")
      .def(py::init([](const std::string& device, size_t staging_slots, size_t staging_slot_bytes,
                       size_t copy_streams, size_t io_threads, bool use_pinned_host_fallback,
                       bool bind_numa_node) {
             return std::make_unique<PipelineBeingMade>(
                 device, pipeline_settings(staging_slots, staging_slot_bytes, copy_streams,
                                           io_threads, use_pinned_host_fallback, bind_numa_node));
           }),
           py::arg("device"), py::arg("staging_slots"), py::arg("staging_slot_bytes"),
           py::arg("copy_streams"), py::arg("io_threads"), py::arg("use_pinned_host_fallback"),
           py::arg("bind_numa_node") = true,
           "Start making a LoadPipeline (arguments as LoadPipeline's) on a thread of the core's.")
      .def("result", &PipelineBeingMade::result,
           "The LoadPipeline, waiting for it without the GIL; raises what making it raised.");

  py::class_<LoadPipeline, std::shared_ptr<LoadPipeline>>(m, "LoadPipeline")
      .def(py::init([](const std::string& device, size_t staging_slots, size_t staging_slot_bytes,
                       size_t copy_streams, size_t io_threads, bool use_pinned_host_fallback,
                       bool bind_numa_node) {
             PipelineSettings s =
                 pipeline_settings(staging_slots, staging_slot_bytes, copy_streams, io_threads,
                                   use_pinned_host_fallback, bind_numa_node);
             BlockingCall blocking;
             return LoadPipeline::create(device, s);
           }),
           py::arg("device"), py::arg("staging_slots"), py::arg("staging_slot_bytes"),
           py::arg("copy_streams"), py::arg("io_threads"), py::arg("use_pinned_host_fallback"),
           py::arg("bind_numa_node") = true)
      .def(
          "start_local",
          [](LoadPipeline& p, std::vector<ShardSource> shards, bool mmap, bool host_staging,
             bool fail_on_checksum_mismatch, const py::object& wanted, uint64_t device_cap) {
            for (const auto& shard : shards) {
              if (shard.path.empty()) {
                throw CoreError(ErrorKind::InvalidArgument,
                                "shard '" + shard.name + "' has no path to read");
              }
            }
            SessionOptions options;
            options.wanted = wanted_names(wanted);
            BlockingCall blocking;
            options.mmap = mmap;
            options.host_staging = host_staging;
            options.fail_on_checksum_mismatch = fail_on_checksum_mismatch;
            options.device_cap = device_cap;
            return p.start_local(std::move(shards), options);
          },
          py::arg("shards"), py::kw_only(), py::arg("mmap") = false,
          py::arg("host_staging") = false, py::arg("fail_on_checksum_mismatch") = true,
          py::arg("wanted") = py::none(), py::arg("device_cap") = 0,
          "Start a load of local files (every ShardSource has a path) read by the io threads. "
          "wanted: None (every tensor) or the names of the tensors to load (only their bytes "
          "are read). device_cap: on a GPU (direct), a streamed load holding at most this many "
          "bytes of device memory for tensors not yet dropped (0: not bounded; the load keeps "
          "what it returns). Raises GPUOutOfMemory when that memory cannot be allocated.")
      .def(
          "start_fed",
          [](LoadPipeline& p, std::vector<ShardSource> shards, bool host_staging,
             bool fail_on_checksum_mismatch, const py::object& wanted, bool direct_io, bool mmap,
             uint64_t device_cap) {
            SessionOptions options;
            options.wanted = wanted_names(wanted);
            BlockingCall blocking;
            options.host_staging = host_staging;
            options.fail_on_checksum_mismatch = fail_on_checksum_mismatch;
            options.direct_io = direct_io;
            options.mmap = mmap;
            options.device_cap = device_cap;
            return p.start_fed(std::move(shards), options);
          },
          py::arg("shards"), py::kw_only(), py::arg("host_staging") = false,
          py::arg("fail_on_checksum_mismatch") = true, py::arg("wanted") = py::none(),
          py::arg("direct_io") = false, py::arg("mmap") = false, py::arg("device_cap") = 0,
          "Start a load whose byte ranges the caller fetches into landings (acquire/commit); a "
          "ShardSource with a path is a local file the io threads read instead (a cache hit). "
          "direct_io: read those files with O_DIRECT into staging slots where the filesystem "
          "allows it. mmap: on cpu, map them copy-on-write. wanted, device_cap: as for "
          "start_local.")
      .def("close", &LoadPipeline::close, py::call_guard<BlockingCall>())
      .def_property_readonly("device", &LoadPipeline::device)
      .def_property_readonly("is_cuda", &LoadPipeline::is_cuda)
      .def(
          "memory_info",
          [](const LoadPipeline& p) -> py::object {
            if (!p.context()) return py::none();
            auto info = p.context()->memory_info();
            return py::make_tuple(info.first, info.second);
          },
          "(free, total) bytes of the target GPU, or None on cpu.")
      .def_property_readonly("device_name", [](const LoadPipeline& p) {
        return p.context() ? p.context()->name() : std::string("cpu");
      });

  register_struct_bindings(m);
  register_checksum_bindings(m);
  register_http_bindings(m);
  register_file_bindings(m);
}
