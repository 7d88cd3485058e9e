#include "device_arena.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "arena_pool.hpp"
#include "errors.hpp"
#include "teardown_failures.hpp"

namespace blob2gpu {

namespace {
std::atomic<int64_t> g_live_arenas{0};
constexpr size_t kMinDeviceBytes = 256;

std::string mib(size_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}
}  // namespace

int64_t DeviceArena::live_count() {
  return g_live_arenas.load();
}

DeviceArena::DeviceArena() {
  g_live_arenas++;
}

std::shared_ptr<DeviceArena> DeviceArena::on_device(std::shared_ptr<CudaContext> ctx, size_t bytes,
                                                    const std::string& label) {
  std::shared_ptr<DeviceArena> arena(new DeviceArena());
  ScopedContext bind(*ctx);
  CUdeviceptr ptr = 0;
  size_t request = bytes < kMinDeviceBytes ? kMinDeviceBytes : bytes;
  CUresult rc = cuda_driver().cuMemAlloc(&ptr, request);
  if (rc == CUDA_ERROR_OUT_OF_MEMORY) {
    size_t free_bytes = 0, total = 0;
    cuda_driver().cuMemGetInfo(&free_bytes, &total);
    throw CoreError(ErrorKind::GPUOutOfMemory, label + ": cuda:" + std::to_string(ctx->ordinal()) +
                                                   " is out of memory (asked " + mib(request) +
                                                   ", " + mib(free_bytes) + " free of " +
                                                   mib(total) + ")")
        .with_hint("free GPU memory, use a larger GPU, or load fewer tensors");
  }
  check_cuda(rc, label + ": cuMemAlloc of " + mib(request));
  arena->ctx_ = std::move(ctx);
  arena->address_ = ptr;
  arena->size_ = bytes;
  return arena;
}

std::shared_ptr<DeviceArena> DeviceArena::pool_view(std::shared_ptr<CudaContext> ctx,
                                                    uint64_t address, size_t bytes) {
  std::shared_ptr<DeviceArena> arena(new DeviceArena());
  arena->ctx_ = std::move(ctx);
  arena->address_ = address;
  arena->size_ = bytes;
  return arena;
}

void DeviceArena::note_consumer(CUstream stream) {
  std::lock_guard<std::mutex> lock(consumers_mutex_);
  if (std::find(consumers_.begin(), consumers_.end(), stream) == consumers_.end()) {
    consumers_.push_back(stream);
  }
}

void DeviceArena::note_unnamed_consumer() {
  std::lock_guard<std::mutex> lock(consumers_mutex_);
  unnamed_consumer_ = true;
}

void DeviceArena::return_to_pool() noexcept {
  // A forked child's arenas are the parent's memory, and the pool's mutex may have been held by
  // a parent thread at fork(): leave both alone.
  if (cuda_driver_inherited_by_fork()) return;
  // The pool reuses these bytes once the copies into them (the fence) and every consumer's work
  // queued on them so far (an event recorded now on each stream it imported a tensor on) are done.
  std::vector<std::shared_ptr<CudaEvent>> waits = fence_;
  bool reusable = !unnamed_consumer_;
  ScopedContext bind(*ctx_, std::nothrow);
  if (!bind.bound()) reusable = false;  // nothing can be recorded: never written again
  for (CUstream stream : consumers_) {
    if (!reusable) break;
    std::shared_ptr<CudaEvent> event = CudaEvent::create_for_teardown(ctx_);
    if (!event || !event->record_for_teardown(stream)) {
      reusable = false;  // e.g. the consumer destroyed its stream: its work cannot be waited for
      break;
    }
    waits.push_back(std::move(event));
  }
  pool_->give_back(*this, std::move(waits), reusable);
}

std::shared_ptr<DeviceArena> DeviceArena::on_host(size_t bytes, const std::string& label,
                                                  bool populate) {
  std::shared_ptr<DeviceArena> arena(new DeviceArena());
  try {
    arena->host_ = HostBuffer::pageable(bytes, populate);  // every byte will be written
  } catch (const std::bad_alloc&) {
    throw CoreError(ErrorKind::HostOutOfMemory,
                    label + ": cannot allocate " + mib(bytes) + " of host memory for the shard")
        .with_hint("free memory or load to a GPU");
  }
  arena->address_ = reinterpret_cast<uint64_t>(arena->host_.data());
  arena->size_ = bytes;
  return arena;
}

std::shared_ptr<DeviceArena> DeviceArena::map_file(int fd, uint64_t file_size, uint64_t data_offset,
                                                   const std::string& label) {
  std::shared_ptr<DeviceArena> arena(new DeviceArena());
  // Private and writable: consumers may write into tensors without touching the file, and the
  // file's later changes are not our tensors' (pages are copied on first write).
  void* p = mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) {
    throw CoreError(ErrorKind::SourceReadError, label + ": mmap failed: " + std::strerror(errno));
  }
  arena->mapping_ = p;
  arena->mapping_bytes_ = file_size;
  arena->address_ = reinterpret_cast<uint64_t>(p) + data_offset;
  arena->size_ = file_size - data_offset;
  return arena;
}

DeviceArena::~DeviceArena() {
  if (pool_) {
    return_to_pool();  // reused by the load; the pool frees its memory when it goes
  } else if (ctx_) {
    // Teardown form: this runs from the DLPack deleter and at interpreter exit, where a throw is
    // std::terminate. When the context cannot be bound the memory is left to the driver.
    ScopedContext bind(*ctx_, std::nothrow);
    if (bind.bound()) {
      // A copy still in flight must not land in freed (and maybe reused) memory.
      for (const auto& event : fence_) event->synchronize_for_teardown();
      check_teardown(cuda_driver_if_loaded()->cuMemFree(address_), "cuMemFree");
    }
  }
  if (mapping_ != nullptr) munmap(mapping_, mapping_bytes_);
  g_live_arenas--;
}

}  // namespace blob2gpu
