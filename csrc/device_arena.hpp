// DeviceArena: the destination of one tensor group's bytes (a whole shard's data region when the
// load keeps what it returns; see shard_layout.hpp), or of one re-aligned tensor. The arena mirrors
// its part of the shard byte for byte, so a tensor is base + offset and a staging slot becomes one
// contiguous copy per group whatever the tensor boundaries. Tensors hold the arena through
// shared_ptr; it goes when the last tensor (or DLPack capsule) referencing it goes: its own
// allocation is freed then (cuMemFree), while an arena cut from a streamed load's pool gives its
// bytes back to the pool for reuse, ordered after its consumers' streams (arena_pool.hpp).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_device.hpp"
#include "host_buffer.hpp"

namespace blob2gpu {

class ArenaPool;

class DeviceArena {
 public:
  // One device allocation of `bytes` (at least 256 bytes, 256-aligned). Throws GPUOutOfMemory with
  // the label and the sizes when the driver refuses.
  static std::shared_ptr<DeviceArena> on_device(std::shared_ptr<CudaContext> ctx, size_t bytes,
                                                const std::string& label);
  // Page-aligned host memory (target cpu). populate: made resident now; otherwise the writer
  // populates each range before writing it (HostBuffer::populate_for_write).
  static std::shared_ptr<DeviceArena> on_host(size_t bytes, const std::string& label,
                                              bool populate = true);
  // A private copy-on-write mapping of a whole file; the arena starts at data_offset in it.
  static std::shared_ptr<DeviceArena> map_file(int fd, uint64_t file_size, uint64_t data_offset,
                                               const std::string& label);
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  // Address of the first byte: a device pointer on CUDA, a host pointer otherwise.
  uint64_t address() const { return address_; }
  uint8_t* host_data() const { return reinterpret_cast<uint8_t*>(address_); }  // host arenas only
  size_t size() const { return size_; }
  bool on_cuda() const { return ctx_ != nullptr; }
  const std::shared_ptr<CudaContext>& context() const { return ctx_; }

  // Events that complete once every write into the arena has landed. Set once, after the last
  // copy into it was enqueued; consumers' streams wait on them, and the arena waits on them before
  // freeing so a pending copy never lands in freed memory.
  void set_fence(std::vector<std::shared_ptr<CudaEvent>> fence) { fence_ = std::move(fence); }
  const std::vector<std::shared_ptr<CudaEvent>>& fence() const { return fence_; }

  // A consumer imported a tensor of this arena on `stream` (`__dlpack__(stream=...)`): its work on
  // the tensor is queued there. Pool arenas record an event on each such stream when they go, and
  // the pool reuses their bytes only after it. Thread-safe.
  void note_consumer(CUstream stream);
  // A consumer imported a tensor without naming its stream (stream=-1): the pool will not reuse
  // the arena's bytes during the load.
  void note_unnamed_consumer();
  // Whether the arena was cut from a streamed load's pool.
  bool pooled() const { return pool_ != nullptr; }

  // Arenas alive in this process (host and device), for leak checks.
  static int64_t live_count();

 private:
  friend class ArenaPool;
  DeviceArena();  // counts the arena; the destructor uncounts it, even for a failed factory
  // A view of [address, address + bytes) of a pool's memory (the pool sets the rest).
  static std::shared_ptr<DeviceArena> pool_view(std::shared_ptr<CudaContext> ctx, uint64_t address,
                                                size_t bytes);
  // Gives a pool arena's bytes back (teardown form: never throws).
  void return_to_pool() noexcept;

  std::shared_ptr<CudaContext> ctx_;  // null for host arenas
  uint64_t address_ = 0;
  size_t size_ = 0;
  HostBuffer host_;          // host arenas
  void* mapping_ = nullptr;  // mapped-file arenas
  size_t mapping_bytes_ = 0;
  std::vector<std::shared_ptr<CudaEvent>> fence_;

  // Arenas of a streamed load's pool (views of its memory); the fields below are the pool's, under
  // its mutex.
  std::shared_ptr<ArenaPool> pool_;
  uint64_t pool_bytes_ = 0;  // what the budget counts (256-aligned)
  bool kept_ = false;        // the budget no longer counts it

  std::mutex consumers_mutex_;
  std::vector<CUstream> consumers_;  // streams tensors of this arena were imported on
  bool unnamed_consumer_ = false;
};

}  // namespace blob2gpu
