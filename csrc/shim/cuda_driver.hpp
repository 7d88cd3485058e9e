// The CUDA driver, loaded at run time. This is the only place that calls dlopen/dlsym: the rest of
// the core calls through the table returned by cuda_driver(), so one wheel serves CPU and GPU
// hosts.
#pragma once

#include <string>

#include "shim/cuda_driver_api.h"

namespace blob2gpu {

// Environment variable naming the driver library to load instead of libcuda.so.1 (tests point it
// at the fake driver).
constexpr const char* kCudaDriverEnv = "BLOB2GPU_CUDA_DRIVER";

struct CudaDriver {
  std::string path;  // the library that was loaded
  int version = 0;   // cuDriverGetVersion
  PFN_cuInit cuInit = nullptr;
  PFN_cuDriverGetVersion cuDriverGetVersion = nullptr;
  PFN_cuDeviceGetCount cuDeviceGetCount = nullptr;
  PFN_cuDeviceGet cuDeviceGet = nullptr;
  PFN_cuDeviceGetName cuDeviceGetName = nullptr;
  PFN_cuDeviceTotalMem_v2 cuDeviceTotalMem = nullptr;
  PFN_cuDeviceGetAttribute cuDeviceGetAttribute = nullptr;
  PFN_cuDeviceGetPCIBusId cuDeviceGetPCIBusId = nullptr;
  PFN_cuDevicePrimaryCtxRetain cuDevicePrimaryCtxRetain = nullptr;
  PFN_cuDevicePrimaryCtxRelease_v2 cuDevicePrimaryCtxRelease = nullptr;
  PFN_cuCtxSetCurrent cuCtxSetCurrent = nullptr;
  PFN_cuCtxGetCurrent cuCtxGetCurrent = nullptr;
  PFN_cuCtxGetDevice cuCtxGetDevice = nullptr;
  PFN_cuMemGetInfo_v2 cuMemGetInfo = nullptr;
  PFN_cuMemAlloc_v2 cuMemAlloc = nullptr;
  PFN_cuMemFree_v2 cuMemFree = nullptr;
  PFN_cuMemHostAlloc cuMemHostAlloc = nullptr;
  PFN_cuMemFreeHost cuMemFreeHost = nullptr;
  PFN_cuMemcpyHtoDAsync_v2 cuMemcpyHtoDAsync = nullptr;
  PFN_cuMemcpyDtoHAsync_v2 cuMemcpyDtoHAsync = nullptr;
  PFN_cuStreamCreate cuStreamCreate = nullptr;
  PFN_cuStreamDestroy_v2 cuStreamDestroy = nullptr;
  PFN_cuStreamSynchronize cuStreamSynchronize = nullptr;
  PFN_cuStreamWaitEvent cuStreamWaitEvent = nullptr;
  PFN_cuEventCreate cuEventCreate = nullptr;
  PFN_cuEventDestroy_v2 cuEventDestroy = nullptr;
  PFN_cuEventRecord cuEventRecord = nullptr;
  PFN_cuEventQuery cuEventQuery = nullptr;
  PFN_cuEventSynchronize cuEventSynchronize = nullptr;
  PFN_cuGetErrorName cuGetErrorName = nullptr;
  PFN_cuGetErrorString cuGetErrorString = nullptr;
};

// Why there is no usable driver, as code reads it (Python: _core.DriverStatus, and the
// driver_status of a CudaDriverUnavailable error): the diagnosis, never parsed from a message.
enum class DriverStatus {
  Loaded = 0,         // loaded and initialized
  NotFound,           // dlopen failed: no such library, or one that cannot be loaded
  MissingEntryPoint,  // a driver older than CUDA 11.0 (an entry point the core calls is missing)
  InitFailed,         // cuInit failed (no usable GPU, driver and kernel module disagree)
  NoDevice,           // loaded and initialized, but it reports no GPU
};

// What loading the driver came to: its status, the library (as named or found) and the detail
// that says why (dlerror's reason without the path, the missing entry point, cuInit's result).
struct DriverLoad {
  DriverStatus status = DriverStatus::Loaded;
  std::string path;
  std::string detail;
};

// Loads and initializes the driver once per process (thread-safe). Throws CoreError
// CudaDriverUnavailable naming the library and the reason when it cannot (its code: the
// DriverStatus).
const CudaDriver& cuda_driver();

// Loads the driver as cuda_driver() does and says what that came to; never throws.
DriverLoad driver_load();

// fork() safety (cuda_device.cpp registers the pthread_atfork handlers): held before a fork, so no
// thread is inside the driver's loading when the process is copied, and released after it in
// both the parent and the child.
void hold_driver_load_for_fork();
void release_driver_load_after_fork();

// Whether a driver was loaded successfully (never throws, never loads).
bool cuda_driver_loaded();

// The loaded driver, or null when none was loaded; never loads, never throws. For destructors and
// deleters, which must not throw (see ScopedContext's teardown form).
const CudaDriver* cuda_driver_if_loaded() noexcept;

// Whether this process is a fork of the one that loaded the driver. CUDA does not survive fork():
// in the child every driver call fails (CUDA_ERROR_NOT_INITIALIZED), and the contexts, memory and
// streams it inherited belong to the parent, so teardown code skips them instead of failing.
bool cuda_driver_inherited_by_fork() noexcept;

// Throws CoreError for a failed driver call: GPUOutOfMemory for CUDA_ERROR_OUT_OF_MEMORY, CudaError
// otherwise; the message is "<what>: <CUDA_ERROR_NAME> (<description>)", plus what to do when the
// call failed because the process is a forked child.
void check_cuda(CUresult result, const std::string& what);

}  // namespace blob2gpu
