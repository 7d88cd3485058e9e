// DeviceArena: the destination of one shard's data region (or of one re-aligned tensor). The arena
// mirrors the shard byte for byte, so a tensor is base + offset and a staging slot becomes one
// contiguous copy whatever the tensor boundaries. Tensors hold the arena through shared_ptr; it is
// freed when the last tensor (or DLPack capsule) referencing it goes.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda_device.hpp"
#include "host_buffer.hpp"

namespace blob2gpu {

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

  // Arenas alive in this process (host and device), for leak checks.
  static int64_t live_count();

 private:
  DeviceArena();  // counts the arena; the destructor uncounts it, even for a failed factory
  std::shared_ptr<CudaContext> ctx_;  // null for host arenas
  uint64_t address_ = 0;
  size_t size_ = 0;
  HostBuffer host_;          // host arenas
  void* mapping_ = nullptr;  // mapped-file arenas
  size_t mapping_bytes_ = 0;
  std::vector<std::shared_ptr<CudaEvent>> fence_;
};

}  // namespace blob2gpu
