#include "shim/cuda_driver.hpp"

#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "errors.hpp"

namespace blob2gpu {
namespace {

// Not std::call_once: a fork() while another thread is inside load_driver() would leave the child a
// once-flag that never completes. This mutex is held across fork() instead (see
// hold_driver_load_for_fork), so a child always finds the load either done or not begun.
std::mutex g_load_mutex;
std::atomic<bool> g_load_attempted{false};
CudaDriver g_driver;
std::string g_load_error;  // empty when loaded
DriverLoad g_load;         // what loading came to
bool g_loaded = false;
pid_t g_load_pid = 0;  // the process that loaded (and cuInit'ed) the driver

template <typename Fn>
bool resolve(void* lib, const char* symbol, Fn* slot, std::string* missing) {
  *slot = reinterpret_cast<Fn>(dlsym(lib, symbol));
  if (*slot == nullptr) {
    *missing = symbol;
    return false;
  }
  return true;
}

void load_driver() {
  const char* override_path = std::getenv(kCudaDriverEnv);
  std::string path = (override_path && *override_path) ? override_path : "libcuda.so.1";
  // The library stays loaded for the life of the process: device memory handed to consumers
  // may outlive every blob2gpu object.
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  g_load.path = path;
  if (lib == nullptr) {
    const char* said = dlerror();
    std::string why = said ? said : "unknown error";
    if (why.rfind(path + ": ", 0) == 0) why.erase(0, path.size() + 2);  // dlerror names it again
    g_load = {DriverStatus::NotFound, path, why};
    g_load_error = "cannot load the CUDA driver '" + path + "': " + why +
                   " (is an NVIDIA driver installed? set " + kCudaDriverEnv + " to its path)";
    return;
  }
  CudaDriver d;
  d.path = path;
  std::string missing;
  bool ok = resolve(lib, "cuInit", &d.cuInit, &missing) &&
            resolve(lib, "cuDriverGetVersion", &d.cuDriverGetVersion, &missing) &&
            resolve(lib, "cuDeviceGetCount", &d.cuDeviceGetCount, &missing) &&
            resolve(lib, "cuDeviceGet", &d.cuDeviceGet, &missing) &&
            resolve(lib, "cuDeviceGetName", &d.cuDeviceGetName, &missing) &&
            resolve(lib, "cuDeviceTotalMem_v2", &d.cuDeviceTotalMem, &missing) &&
            resolve(lib, "cuDeviceGetAttribute", &d.cuDeviceGetAttribute, &missing) &&
            resolve(lib, "cuDeviceGetPCIBusId", &d.cuDeviceGetPCIBusId, &missing) &&
            resolve(lib, "cuDevicePrimaryCtxRetain", &d.cuDevicePrimaryCtxRetain, &missing) &&
            resolve(lib, "cuDevicePrimaryCtxRelease_v2", &d.cuDevicePrimaryCtxRelease, &missing) &&
            resolve(lib, "cuCtxSetCurrent", &d.cuCtxSetCurrent, &missing) &&
            resolve(lib, "cuCtxGetCurrent", &d.cuCtxGetCurrent, &missing) &&
            resolve(lib, "cuCtxGetDevice", &d.cuCtxGetDevice, &missing) &&
            resolve(lib, "cuMemGetInfo_v2", &d.cuMemGetInfo, &missing) &&
            resolve(lib, "cuMemAlloc_v2", &d.cuMemAlloc, &missing) &&
            resolve(lib, "cuMemFree_v2", &d.cuMemFree, &missing) &&
            resolve(lib, "cuMemHostAlloc", &d.cuMemHostAlloc, &missing) &&
            resolve(lib, "cuMemFreeHost", &d.cuMemFreeHost, &missing) &&
            resolve(lib, "cuMemcpyHtoDAsync_v2", &d.cuMemcpyHtoDAsync, &missing) &&
            resolve(lib, "cuMemcpyDtoHAsync_v2", &d.cuMemcpyDtoHAsync, &missing) &&
            resolve(lib, "cuStreamCreate", &d.cuStreamCreate, &missing) &&
            resolve(lib, "cuStreamDestroy_v2", &d.cuStreamDestroy, &missing) &&
            resolve(lib, "cuStreamSynchronize", &d.cuStreamSynchronize, &missing) &&
            resolve(lib, "cuStreamWaitEvent", &d.cuStreamWaitEvent, &missing) &&
            resolve(lib, "cuEventCreate", &d.cuEventCreate, &missing) &&
            resolve(lib, "cuEventDestroy_v2", &d.cuEventDestroy, &missing) &&
            resolve(lib, "cuEventRecord", &d.cuEventRecord, &missing) &&
            resolve(lib, "cuEventQuery", &d.cuEventQuery, &missing) &&
            resolve(lib, "cuEventSynchronize", &d.cuEventSynchronize, &missing) &&
            resolve(lib, "cuGetErrorName", &d.cuGetErrorName, &missing) &&
            resolve(lib, "cuGetErrorString", &d.cuGetErrorString, &missing);
  if (!ok) {
    g_load = {DriverStatus::MissingEntryPoint, path, missing};
    g_load_error = "the CUDA driver '" + path + "' lacks the entry point " + missing +
                   " (driver too old? blob2gpu needs CUDA 11.0 or newer)";
    return;
  }
  CUresult rc = d.cuInit(0);
  if (rc != CUDA_SUCCESS) {
    const char* name = nullptr;
    d.cuGetErrorName(rc, &name);
    g_load = {DriverStatus::InitFailed, path, name ? name : std::to_string(rc)};
    g_load_error = "cuInit failed for the CUDA driver '" + path + "': " + g_load.detail +
                   " (no usable GPU, or the driver and "
                   "kernel module disagree; nvidia-smi tells more)";
    return;
  }
  d.cuDriverGetVersion(&d.version);
  g_driver = d;
  g_load_pid = getpid();
  g_loaded = true;
}

}  // namespace

const CudaDriver& cuda_driver() {
  if (!g_load_attempted.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(g_load_mutex);
    if (!g_load_attempted.load(std::memory_order_relaxed)) {
      load_driver();
      g_load_attempted.store(true, std::memory_order_release);
    }
  }
  if (!g_loaded) {
    throw CoreError(ErrorKind::CudaDriverUnavailable, g_load_error, {}, -1,
                    static_cast<int>(g_load.status));
  }
  return g_driver;
}

DriverLoad driver_load() {
  try {
    cuda_driver();
  } catch (const CoreError&) {
  }
  return g_load;
}

void hold_driver_load_for_fork() {
  g_load_mutex.lock();
}

void release_driver_load_after_fork() {
  g_load_mutex.unlock();
}

bool cuda_driver_loaded() {
  return g_loaded;
}

const CudaDriver* cuda_driver_if_loaded() noexcept {
  return g_loaded ? &g_driver : nullptr;
}

bool cuda_driver_inherited_by_fork() noexcept {
  return g_loaded && getpid() != g_load_pid;
}

void check_cuda(CUresult result, const std::string& what) {
  if (result == CUDA_SUCCESS) return;
  const char* name = nullptr;
  const char* text = nullptr;
  if (g_loaded) {
    g_driver.cuGetErrorName(result, &name);
    g_driver.cuGetErrorString(result, &text);
  }
  std::string message = what + ": " + (name ? name : "CUresult " + std::to_string(result));
  if (text) message += std::string(" (") + text + ")";
  if (cuda_driver_inherited_by_fork()) {
    message +=
        "; this process was forked from one that had initialized CUDA, and CUDA cannot be used "
        "in a forked child: start workers with the 'spawn' method, or load in the parent";
  }
  throw CoreError(
      result == CUDA_ERROR_OUT_OF_MEMORY ? ErrorKind::GPUOutOfMemory : ErrorKind::CudaError,
      message);
}

}  // namespace blob2gpu
