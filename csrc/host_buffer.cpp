#include "host_buffer.hpp"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

#include "cuda_device.hpp"
#include "teardown_failures.hpp"

namespace blob2gpu {

namespace {
constexpr size_t kPageBytes = 4096;
constexpr size_t kHugePageBytes = 2u << 20;
size_t round_up(size_t n, size_t to) {
  return (n + to - 1) / to * to;
}
#ifdef MADV_POPULATE_WRITE
constexpr int kMadvPopulateWrite = MADV_POPULATE_WRITE;
#else
constexpr int kMadvPopulateWrite = 23;  // <linux/mman.h>, Linux 5.14
#endif
}  // namespace

HostBuffer HostBuffer::pageable(size_t bytes, bool prefault) {
  HostBuffer b;
  if (bytes >= kHugePageBytes) {
    // Large buffers come straight from the kernel with transparent huge pages asked for: the first
    // write into fresh memory then faults once per 2 MiB instead of once per 4 KiB, which is most
    // of the cost of reading a shard into new memory.
    size_t length = round_up(bytes, kHugePageBytes);
    void* m = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    madvise(m, length, MADV_HUGEPAGE);
    // Populated in one call rather than faulted in one by one while a socket or pread copies
    // into them, so the copy itself runs without page faults. What fresh memory costs (the
    // kernel zeroing it, and in a VM the host backing it: 0.1 to 1.3 CPU s/GB seen on one) is
    // the same either way. Kernels before 5.14 refuse the advice; the pages then fault in.
    if (prefault) madvise(m, length, kMadvPopulateWrite);
    b.data_ = {static_cast<uint8_t*>(m), [length](uint8_t* q) { munmap(q, length); }};
    b.size_ = bytes;
    return b;
  }
  void* p = std::aligned_alloc(kPageBytes, round_up(bytes == 0 ? 1 : bytes, kPageBytes));
  if (p == nullptr) throw std::bad_alloc();
  b.data_ = {static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); }};
  b.size_ = bytes;
  return b;
}

void HostBuffer::populate_for_write(uint8_t* p, size_t n) {
  if (n == 0) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p) / kPageBytes * kPageBytes;
  const uintptr_t end = round_up(reinterpret_cast<uintptr_t>(p) + n, kPageBytes);
  madvise(reinterpret_cast<void*>(begin), end - begin, kMadvPopulateWrite);
}

HostBuffer HostBuffer::pinned(const std::shared_ptr<CudaContext>& ctx, size_t bytes) {
  HostBuffer b;
  ScopedContext bind(*ctx);
  void* p = nullptr;
  CUresult rc = cuda_driver().cuMemHostAlloc(&p, bytes, CU_MEMHOSTALLOC_PORTABLE);
  // Only "no memory left to page-lock" is a refusal the caller may answer by falling back to
  // pageable memory. Any other error (no valid context, a sticky error, a forked child) would
  // fail the pageable load too, or hide a broken driver behind a slow load: it is raised.
  if (rc == CUDA_ERROR_OUT_OF_MEMORY) return b;
  if (rc == CUDA_SUCCESS && p == nullptr) return b;
  check_cuda(rc, "cuMemHostAlloc of " + std::to_string(bytes) + " bytes of pinned staging memory");
  // The deleter keeps the context alive: pinned memory must be freed before its context goes. It
  // runs in destructors, so it uses the teardown form and never throws.
  b.data_ = {static_cast<uint8_t*>(p), [ctx](uint8_t* q) {
               ScopedContext bind_for_free(*ctx, std::nothrow);
               if (bind_for_free.bound()) {
                 check_teardown(cuda_driver_if_loaded()->cuMemFreeHost(q), "cuMemFreeHost");
               }
             }};
  b.size_ = bytes;
  b.pinned_ = true;
  return b;
}

}  // namespace blob2gpu
