// A CUDA driver in front of another one, for tests/gpu: it links against the real libcuda (or the
// fake driver), so every entry point the core looks up on this library's handle is the driver's
// own (dlsym searches a library's dependencies after it), except cuMemcpyHtoDAsync_v2. Once armed
// (stall_arm), the next host-to-device copy first queues a host function (cuLaunchHostFunc) that
// holds its stream until the test releases it: the core's copy then stays unfinished for as long
// as the test wants, on real hardware, and whatever waits on it waits for real.
//
// Built by tests/gpu/test_cuda_rules_on_gpu.py with -DSTALL_DRIVER="<the driver's name or path>".
#include <dlfcn.h>
#include <pthread.h>
#include <time.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>

#ifndef STALL_DRIVER
#error "build with -DSTALL_DRIVER='\"libcuda.so.1\"' (the driver this library links against)"
#endif

#define STALL_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using CUresult = int;
using CUstream = void*;
using HostFn = void (*)(void*);
using CopyFn = CUresult (*)(uint64_t, const void*, size_t, CUstream);
using LaunchFn = CUresult (*)(CUstream, HostFn, void*);
constexpr CUresult kUnknown = 999;       // CUDA_ERROR_UNKNOWN
constexpr CUresult kNotSupported = 801;  // CUDA_ERROR_NOT_SUPPORTED

pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
bool g_armed = false;
bool g_released = false;
int g_holds = 0;     // holds that have started (the stream reached the gate)
int g_limit_s = 30;  // a hold ends by itself after this long: a test never hangs on it
CUresult g_launch_error = 0;

pthread_once_t g_resolve_once = PTHREAD_ONCE_INIT;
CopyFn g_copy = nullptr;
LaunchFn g_launch = nullptr;

void resolve() {
  // Already loaded, as this library's dependency: RTLD_NOLOAD only finds it.
  void* lib = dlopen(STALL_DRIVER, RTLD_NOW | RTLD_NOLOAD);
  if (lib == nullptr) lib = dlopen(STALL_DRIVER, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return;
  g_copy = reinterpret_cast<CopyFn>(dlsym(lib, "cuMemcpyHtoDAsync_v2"));
  g_launch = reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchHostFunc"));
}

}  // namespace

// The host function: holds its stream until stall_release() or the arm's time limit.
STALL_EXPORT void stall_hold(void*) {
  timespec deadline{};
  clock_gettime(CLOCK_REALTIME, &deadline);
  pthread_mutex_lock(&g_mu);
  deadline.tv_sec += g_limit_s;
  ++g_holds;
  pthread_cond_broadcast(&g_cv);
  while (!g_released) {
    if (pthread_cond_timedwait(&g_cv, &g_mu, &deadline) == ETIMEDOUT) break;
  }
  pthread_mutex_unlock(&g_mu);
}

// The next host-to-device copy waits behind a hold of at most limit_s seconds.
STALL_EXPORT void stall_arm(int limit_s) {
  pthread_mutex_lock(&g_mu);
  g_armed = true;
  g_released = false;
  g_limit_s = limit_s;
  pthread_mutex_unlock(&g_mu);
}

// Ends every hold now and later ones at once (until the next stall_arm).
STALL_EXPORT void stall_release(void) {
  pthread_mutex_lock(&g_mu);
  g_released = true;
  pthread_cond_broadcast(&g_cv);
  pthread_mutex_unlock(&g_mu);
}

// A hold that starts from now on lasts until stall_release() or limit_s seconds; no copy is gated.
STALL_EXPORT void stall_reset(int limit_s) {
  pthread_mutex_lock(&g_mu);
  g_released = false;
  g_limit_s = limit_s;
  pthread_mutex_unlock(&g_mu);
}

// Waits (asleep) up to timeout_s until `holds` holds have started, or the gate could not be
// queued; returns the holds started so far.
STALL_EXPORT int stall_wait_held(int holds, double timeout_s) {
  timespec deadline{};
  clock_gettime(CLOCK_REALTIME, &deadline);
  const auto whole = static_cast<time_t>(timeout_s);
  deadline.tv_sec += whole;
  deadline.tv_nsec += static_cast<long>((timeout_s - static_cast<double>(whole)) * 1e9);
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec += 1;
    deadline.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&g_mu);
  while (g_holds < holds && g_launch_error == 0) {
    if (pthread_cond_timedwait(&g_cv, &g_mu, &deadline) == ETIMEDOUT) break;
  }
  const int started = g_holds;
  pthread_mutex_unlock(&g_mu);
  return started;
}

// The CUresult cuLaunchHostFunc failed with when the gate was queued (0: it did not fail).
STALL_EXPORT int stall_launch_error(void) {
  pthread_mutex_lock(&g_mu);
  const CUresult error = g_launch_error;
  pthread_mutex_unlock(&g_mu);
  return error;
}

STALL_EXPORT CUresult cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t bytes,
                                           CUstream stream) {
  pthread_once(&g_resolve_once, resolve);
  if (g_copy == nullptr) return kUnknown;
  pthread_mutex_lock(&g_mu);
  const bool gate = g_armed;
  g_armed = false;
  pthread_mutex_unlock(&g_mu);
  if (gate) {
    const CUresult rc = g_launch ? g_launch(stream, stall_hold, nullptr) : kNotSupported;
    if (rc != 0) {
      pthread_mutex_lock(&g_mu);
      g_launch_error = rc;
      pthread_cond_broadcast(&g_cv);
      pthread_mutex_unlock(&g_mu);
    }
  }
  return g_copy(dst, src, bytes, stream);
}
