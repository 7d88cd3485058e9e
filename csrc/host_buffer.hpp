// Host memory owners. Each says which guarantee it gives:
//  - pageable: page-aligned (4096) memory; buffers of 2 MiB and more are mapped from the kernel
//    with transparent huge pages advised (and, asked, populated up front). DMA from it is staged
//    by the driver.
//  - pinned: page-locked through cuMemHostAlloc (portable), so H2D copies from it are true DMA and
//    can run asynchronously with the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace blob2gpu {

class CudaContext;

class HostBuffer {
 public:
  HostBuffer() = default;
  // Throws std::bad_alloc when the heap refuses. prefault: a buffer of 2 MiB or more is
  // populated at once (huge pages zeroed in one kernel call) instead of faulting page by page
  // as it is first written, for memory that will all be written anyway.
  static HostBuffer pageable(size_t bytes, bool prefault = false);
  // Makes the pages under [p, p + n) resident for writing in one kernel call (huge pages zeroed
  // at once) just before a socket or pread fills them, instead of faulting them in one by one
  // during the copy. Populating a shard's range at a time rather than the whole arena when it is
  // made keeps that cost spread over the load, beside the network, instead of at the start.
  // Advisory: kernels before 5.14 refuse it and the pages fault in as they are written.
  static void populate_for_write(uint8_t* p, size_t n);
  // Returns an empty buffer (data() == nullptr) when the driver has no memory left to pin
  // (CUDA_ERROR_OUT_OF_MEMORY); the caller decides between falling back and raising, since only it
  // knows the setting. Throws CudaError naming the driver error for any other failure.
  static HostBuffer pinned(const std::shared_ptr<CudaContext>& ctx, size_t bytes);

  uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }
  bool is_pinned() const { return pinned_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  std::unique_ptr<uint8_t, std::function<void(uint8_t*)>> data_;
  size_t size_ = 0;
  bool pinned_ = false;
};

}  // namespace blob2gpu
