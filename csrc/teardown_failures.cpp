#include "teardown_failures.hpp"

#include <atomic>
#include <cstdio>

#include "shim/cuda_driver.hpp"

namespace blob2gpu {

namespace {
std::atomic<uint64_t> g_failures{0};
}  // namespace

void note_teardown_failure(const char* call, CUresult result) noexcept {
  if (g_failures.fetch_add(1) != 0) return;  // printed once: at exit there may be thousands
  const char* name = nullptr;
  if (const CudaDriver* d = cuda_driver_if_loaded()) d->cuGetErrorName(result, &name);
  // stdio, not iostream: it needs no static objects, which may already be gone at exit.
  std::fprintf(stderr,
               "blob2gpu: %s failed during teardown: %s (%d); the resource is left to the driver, "
               "which reclaims it when the process ends. Later teardown failures are only counted "
               "(blob2gpu._core.teardown_failures()).\n",
               call, name ? name : "CUresult", static_cast<int>(result));
}

uint64_t teardown_failures() noexcept {
  return g_failures.load();
}

}  // namespace blob2gpu
