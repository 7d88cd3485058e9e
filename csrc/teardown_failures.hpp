// Failed driver calls made while something is torn down: destructors, the DLPack deleter a
// consumer calls from C++, threads that end at interpreter exit. Nothing there may throw (a throw
// out of a destructor is std::terminate), and nobody is left to catch an error, so a failure is
// counted here and the first one printed to stderr. Owns one process-wide counter; no driver calls.
#pragma once

#include <cstdint>

#include "shim/cuda_driver_api.h"

namespace blob2gpu {

// Counts a failed teardown call; prints the first one (its call and the driver's error name) to
// stderr, the later ones only add to the count. Never throws.
void note_teardown_failure(const char* call, CUresult result) noexcept;

// note_teardown_failure when `result` is not CUDA_SUCCESS.
inline void check_teardown(CUresult result, const char* call) noexcept {
  if (result != CUDA_SUCCESS) note_teardown_failure(call, result);
}

// Failed teardown calls in this process so far.
uint64_t teardown_failures() noexcept;

}  // namespace blob2gpu
