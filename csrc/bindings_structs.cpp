// The core's plain structs as blob2gpu._core classes: read-only properties named like the C++
// fields, so Python reads `status.header_ready`, not a dict key, and _core.pyi can type them.
// ChunkChecksums and ShardSource are also built by Python: they are what a load starts from.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "bindings_gil.hpp"
#include "checksum.hpp"
#include "chunk_verifier.hpp"
#include "errors.hpp"
#include "load_session.hpp"
#include "numa_placement.hpp"

namespace py = pybind11;
using namespace blob2gpu;

namespace {

ChunkChecksums make_chunk_checksums(uint64_t chunk_bytes,
                                    std::optional<std::vector<uint32_t>> crc32c,
                                    std::optional<std::vector<py::bytes>> sha256) {
  if (chunk_bytes == 0) {
    throw CoreError(ErrorKind::InvalidArgument, "chunk checksums need chunk_bytes > 0");
  }
  ChunkChecksums sums;
  sums.chunk_bytes = chunk_bytes;
  if (crc32c) sums.crc32c = std::move(*crc32c);
  if (sha256) {
    for (const py::bytes& digest : *sha256) {
      std::string_view raw = digest;
      if (raw.size() != 32) {
        throw CoreError(ErrorKind::InvalidArgument, "a SHA-256 chunk digest must be 32 bytes");
      }
      std::array<uint8_t, 32> d{};
      std::memcpy(d.data(), raw.data(), 32);
      sums.sha256.push_back(d);
    }
  }
  return sums;
}

ShardSource make_shard_source(std::string name, uint64_t size, std::string path,
                              std::optional<ChunkChecksums> checksums,
                              std::optional<py::bytes> content_md5) {
  ShardSource source;
  source.name = std::move(name);
  source.size = size;
  source.path = std::move(path);
  if (checksums) source.checksums = std::move(*checksums);
  if (content_md5) {
    std::string_view raw = *content_md5;
    if (raw.size() != Md5::kDigestBytes) {
      throw CoreError(ErrorKind::InvalidArgument, "a Content-MD5 must be 16 bytes");
    }
    source.content_md5.assign(raw.begin(), raw.end());
  }
  return source;
}

py::bytes as_bytes(const uint8_t* data, size_t n) {
  return py::bytes(reinterpret_cast<const char*>(data), n);
}

}  // namespace

void register_struct_bindings(py::module_& m) {
  m.def(
      "numa_placement",
      [](int ordinal, const std::string& sys_root) {
        NumaPlacement p;
        {
          BlockingCall blocking;  // reads sysfs, may load the driver
          p = numa_placement(ordinal, sys_root);
        }
        py::dict d;
        d["node"] = p.node;
        d["source"] = p.source;
        d["cpus"] = p.cpus;
        return d;
      },
      py::arg("ordinal"), py::arg("sys_root") = "/sys",
      "Where GPU `ordinal`'s pipeline goes on the host: {'node': the nearest NUMA node (-1: "
      "none), 'source': 'driver' (CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID), 'sysfs' (the GPU's PCI "
      "device under sys_root) or 'none', 'cpus': the node's CPUs this thread may run on}. Never "
      "raises: no driver is no node.");
  py::class_<ChunkChecksums>(
      m, "ChunkChecksums",
      "A shard's expected checksums, one per chunk_bytes chunk of the file "
      "(the last one shorter): CRC32Cs, or SHA-256 digests (verify='sha256', "
      "then checked instead of the CRCs).")
      .def(py::init(&make_chunk_checksums), py::arg("chunk_bytes"), py::kw_only(),
           py::arg("crc32c") = py::none(), py::arg("sha256") = py::none(),
           "Without digests nothing is checked. Raises InvalidArgument for chunk_bytes 0 or a "
           "digest that is not 32 bytes.")
      .def_readonly("chunk_bytes", &ChunkChecksums::chunk_bytes)
      .def_readonly("crc32c", &ChunkChecksums::crc32c)
      .def_property_readonly("sha256", [](const ChunkChecksums& c) {
        py::list out;
        for (const auto& d : c.sha256) out.append(as_bytes(d.data(), d.size()));
        return out;
      });

  py::class_<ShardSource>(m, "ShardSource",
                          "One shard a load starts from: its name (errors and reports use it), "
                          "its size, a local path ('' for a fed shard the caller fetches), and "
                          "what checks its bytes.")
      .def(py::init(&make_shard_source), py::arg("name"), py::kw_only(), py::arg("size") = 0,
           py::arg("path") = "", py::arg("checksums") = py::none(),
           py::arg("content_md5") = py::none(),
           "size: the size the source listed (fed shards; a local file's own size is read, and "
           "checked against this one when there are checksums). content_md5: the blob's 16-byte "
           "Content-MD5, checked over the whole blob when no checksums are given and every byte "
           "is read (fed, or from `path`: an NVMe cache hit) before its tensors are handed out. "
           "Raises InvalidArgument for a Content-MD5 that is not 16 bytes.")
      .def_readonly("name", &ShardSource::name)
      .def_readonly("size", &ShardSource::size)
      .def_readonly("path", &ShardSource::path)
      .def_property_readonly("checksums",
                             [](const ShardSource& s) -> std::optional<ChunkChecksums> {
                               if (s.checksums.empty()) return std::nullopt;
                               return s.checksums;
                             })
      .def_property_readonly("content_md5", [](const ShardSource& s) -> py::object {
        if (s.content_md5.empty()) return py::none();
        return as_bytes(s.content_md5.data(), s.content_md5.size());
      });

  py::class_<FeedStatus>(m, "FeedStatus",
                         "What a feeder learns from LoadSession.commit(): where the shard's data "
                         "region starts once its header is ready, or how much header is missing.")
      .def_readonly("header_ready", &FeedStatus::header_ready)
      .def_readonly("data_offset", &FeedStatus::data_offset,
                    "Header ready: 8 + N, where the data starts; else the header's whole length.")
      .def_readonly("header_have", &FeedStatus::header_have,
                    "Header not ready: bytes of it received so far.")
      .def("__repr__", [](const FeedStatus& s) {
        return "FeedStatus(header_ready=" + std::string(s.header_ready ? "True" : "False") +
               ", data_offset=" + std::to_string(s.data_offset) +
               ", header_have=" + std::to_string(s.header_have) + ")";
      });

  py::class_<ShardStats>(m, "ShardStats", "One shard of a load, as LoadSession.stats() saw it.")
      .def_readonly("name", &ShardStats::name)
      .def_readonly("file_bytes", &ShardStats::file_bytes)
      .def_readonly("header_bytes", &ShardStats::header_bytes)
      .def_readonly("data_bytes", &ShardStats::data_bytes)
      .def_readonly("tensors", &ShardStats::tensors,
                    "Tensors this load hands out (a selection may skip some).")
      .def_readonly("needed_bytes", &ShardStats::needed_bytes,
                    "Data bytes this load reads (all of them without a selection).")
      .def_readonly("realigned_tensors", &ShardStats::realigned_tensors,
                    "Tensors copied into their own aligned allocation.")
      .def_readonly("groups", &ShardStats::groups,
                    "Tensor groups (arenas) the shard was cut into: 1 unless the load is streamed.")
      .def_readonly("start_ns", &ShardStats::start_ns,
                    "First work on the shard, from the session start; -1: not yet.")
      .def_readonly("header_ns", &ShardStats::header_ns,
                    "Header parsed and arena allocated; -1: not yet.")
      .def_readonly("published_ns", &ShardStats::published_ns,
                    "Every byte read and enqueued, tensors handed out; -1: not yet.")
      .def_readonly("checksum_failures", &ShardStats::checksum_failures,
                    "Chunks (or the whole blob) that failed their checksum.");

  py::class_<SessionStats>(m, "SessionStats", "A load's counters, as LoadSession.stats() saw them.")
      .def_readonly("device", &SessionStats::device)
      .def_readonly("bytes_read", &SessionStats::bytes_read,
                    "Bytes read from sources, headers included.")
      .def_readonly("elapsed_ns", &SessionStats::elapsed_ns)
      .def_readonly("all_published_ns", &SessionStats::all_published_ns,
                    "When the last shard was handed out, from the session start; -1: not yet.")
      .def_readonly("pinned", &SessionStats::pinned)
      .def_readonly("pinned_fallback", &SessionStats::pinned_fallback)
      .def_readonly("staging_slots", &SessionStats::staging_slots)
      .def_readonly("staging_slot_bytes", &SessionStats::staging_slot_bytes)
      .def_readonly("copy_streams", &SessionStats::copy_streams)
      .def_readonly("io_threads", &SessionStats::io_threads)
      .def_readonly("numa_node", &SessionStats::numa_node,
                    "The GPU's host NUMA node the pipeline's ring and io threads were placed on; "
                    "-1: none (cpu, no NUMA, or bind_numa_node off).")
      .def_readonly("numa_source", &SessionStats::numa_source,
                    "Where the node came from: 'driver' (CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID), "
                    "'sysfs' (the GPU's PCI device), 'none'; '' on cpu.")
      .def_readonly("numa_cpus", &SessionStats::numa_cpus,
                    "CPUs the io threads are bound to (the node's, within this process's "
                    "affinity); 0: not bound.")
      .def_readonly("ring_on_node", &SessionStats::ring_on_node,
                    "The staging ring was pinned under the node's memory policy.")
      .def_readonly("peak_slots_in_flight", &SessionStats::peak_slots_in_flight,
                    "Most slots whose copies were in flight at once.")
      .def_readonly("slot_waits", &SessionStats::slot_waits)
      .def_readonly("mmap", &SessionStats::mmap)
      .def_readonly("host_staging", &SessionStats::host_staging)
      .def_readonly("min_free_device_bytes", &SessionStats::min_free_device_bytes,
                    "Lowest free GPU memory seen at a shard's end; -1: none measured.")
      .def_readonly("verified_bytes", &SessionStats::verified_bytes,
                    "Bytes checked against a manifest.")
      .def_readonly("peak_md5_shards", &SessionStats::peak_md5_shards,
                    "Most shards whose Content-MD5 was being computed at one time (each shard's "
                    "hash is sequential; shards are hashed side by side).")
      .def_readonly("md5_parked_bytes", &SessionStats::md5_parked_bytes,
                    "Bytes that landed ahead of their shard's Content-MD5 and were copied aside "
                    "to wait for it.")
      .def_readonly("direct_io_bytes", &SessionStats::direct_io_bytes,
                    "Bytes read with O_DIRECT (page cache bypassed).")
      .def_readonly("host_populate_seconds", &SessionStats::host_populate_seconds,
                    "CPU time making new host memory resident for writing.")
      .def_readonly("group_landed_bytes", &SessionStats::group_landed_bytes,
                    "A group's exchange: data bytes this process fetched and landed itself.")
      .def_readonly("group_received_bytes", &SessionStats::group_received_bytes,
                    "A group's exchange: data bytes the peers wrote into this load's memory.")
      .def_readonly("checksum_failures", &SessionStats::checksum_failures,
                    "Mismatches let through (fail_on_checksum_mismatch=False), as messages.")
      .def_readonly("shards", &SessionStats::shards)
      .def_readonly("device_cap", &SessionStats::device_cap,
                    "A streamed load's bound on its device memory; 0: not bounded.")
      .def_readonly("stream_buffer_bytes", &SessionStats::stream_buffer_bytes,
                    "The device memory a streamed load took at its start (its slab).")
      .def_readonly("peak_device_bytes", &SessionStats::peak_device_bytes,
                    "Most device bytes a streamed load had allocated at once (its slab, and the "
                    "regions it grew by).")
      .def_readonly("cap_raised_to", &SessionStats::cap_raised_to,
                    "Largest tensor group admitted beyond the cap (one tensor, or a Content-MD5 "
                    "shard, larger than it); 0: none.")
      .def_readonly("mid_load_allocations", &SessionStats::mid_load_allocations,
                    "Regions a streamed load's memory grew by mid-load (cuMemAlloc, a device-wide "
                    "synchronization on a GPU): no room left while its consumer held memory.")
      .def_readonly("kept_beyond_cap", &SessionStats::kept_beyond_cap,
                    "Bytes a streamed consumer kept that the bound stopped counting (so as not "
                    "to wait forever for them).");

  py::class_<PublishedShard>(m, "PublishedShard",
                             "A tensor group ready to hand out (a whole shard unless the load is "
                             "streamed): its shard's index in the load, its TensorViews in file "
                             "order and the shard's __metadata__.")
      .def_readonly("index", &PublishedShard::index)
      .def_readonly("tensors", &PublishedShard::tensors)
      .def_readonly("complete", &PublishedShard::complete,
                    "Every tensor of the shard has now been published (a streamed load hands a "
                    "shard out in tensor groups).")
      .def_property_readonly("metadata", [](const PublishedShard& s) {
        py::dict metadata;
        for (const auto& kv : s.metadata) metadata[py::str(kv.first)] = kv.second;
        return metadata;
      });
}
