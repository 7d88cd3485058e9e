/* The few CUDA driver API declarations blob2gpu uses, written from the driver API reference so that
 * building needs no CUDA toolkit. Both the run-time loader (cuda_driver.cpp) and the test-only fake
 * driver (tests/fake_cuda/) include this file, so they agree on every signature.
 * Only the versioned symbol names that libcuda.so.1 exports are listed (cuMemAlloc_v2, ...). */
#ifndef BLOB2GPU_CUDA_DRIVER_API_H
#define BLOB2GPU_CUDA_DRIVER_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;
typedef struct CUctx_st* CUcontext;
typedef struct CUstream_st* CUstream;
typedef struct CUevent_st* CUevent;

enum {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_INITIALIZED = 3, /* also what a forked child gets once its parent used CUDA */
  CUDA_ERROR_DEINITIALIZED = 4,   /* the driver is shutting down (process exit) */
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_CONTEXT = 201,
  CUDA_ERROR_OPERATING_SYSTEM = 304,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_NOT_READY = 600,
  CUDA_ERROR_ILLEGAL_ADDRESS = 700,
  CUDA_ERROR_CONTEXT_IS_DESTROYED = 709,
  CUDA_ERROR_LAUNCH_FAILED = 719,
  CUDA_ERROR_NOT_PERMITTED = 800,
  CUDA_ERROR_NOT_SUPPORTED = 801,
  CUDA_ERROR_UNKNOWN = 999
};

/* Special stream handles (driver API semantics). */
#define BLOB2GPU_CU_STREAM_LEGACY ((CUstream)0x1)
#define BLOB2GPU_CU_STREAM_PER_THREAD ((CUstream)0x2)

enum { CU_STREAM_DEFAULT = 0x0, CU_STREAM_NON_BLOCKING = 0x1 };
/* The one device attribute the core asks (CUDA 12.2+; older drivers refuse it): the host NUMA
   node nearest the device, -1 when the system has none. */
typedef int CUdevice_attribute;
enum { CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID = 134 };
enum { CU_EVENT_DEFAULT = 0x0, CU_EVENT_BLOCKING_SYNC = 0x1, CU_EVENT_DISABLE_TIMING = 0x2 };
enum { CU_MEMHOSTALLOC_PORTABLE = 0x1, CU_MEMHOSTALLOC_DEVICEMAP = 0x2 };

typedef CUresult (*PFN_cuInit)(unsigned int flags);
typedef CUresult (*PFN_cuDriverGetVersion)(int* version);
typedef CUresult (*PFN_cuDeviceGetCount)(int* count);
typedef CUresult (*PFN_cuDeviceGet)(CUdevice* device, int ordinal);
typedef CUresult (*PFN_cuDeviceGetName)(char* name, int len, CUdevice device);
typedef CUresult (*PFN_cuDeviceTotalMem_v2)(size_t* bytes, CUdevice device);
typedef CUresult (*PFN_cuDeviceGetAttribute)(int* value, CUdevice_attribute attribute,
                                             CUdevice device);
typedef CUresult (*PFN_cuDeviceGetPCIBusId)(char* bus_id, int len, CUdevice device);
typedef CUresult (*PFN_cuDevicePrimaryCtxRetain)(CUcontext* ctx, CUdevice device);
typedef CUresult (*PFN_cuDevicePrimaryCtxRelease_v2)(CUdevice device);
typedef CUresult (*PFN_cuCtxSetCurrent)(CUcontext ctx);
typedef CUresult (*PFN_cuCtxGetCurrent)(CUcontext* ctx);
typedef CUresult (*PFN_cuCtxGetDevice)(CUdevice* device);
typedef CUresult (*PFN_cuMemGetInfo_v2)(size_t* free_bytes, size_t* total_bytes);
typedef CUresult (*PFN_cuMemAlloc_v2)(CUdeviceptr* dptr, size_t bytes);
typedef CUresult (*PFN_cuMemFree_v2)(CUdeviceptr dptr);
typedef CUresult (*PFN_cuMemHostAlloc)(void** pp, size_t bytes, unsigned int flags);
typedef CUresult (*PFN_cuMemFreeHost)(void* p);
typedef CUresult (*PFN_cuMemcpyHtoDAsync_v2)(CUdeviceptr dst, const void* src, size_t bytes,
                                             CUstream stream);
typedef CUresult (*PFN_cuMemcpyDtoHAsync_v2)(void* dst, CUdeviceptr src, size_t bytes,
                                             CUstream stream);
typedef CUresult (*PFN_cuStreamCreate)(CUstream* stream, unsigned int flags);
typedef CUresult (*PFN_cuStreamDestroy_v2)(CUstream stream);
typedef CUresult (*PFN_cuStreamSynchronize)(CUstream stream);
typedef CUresult (*PFN_cuStreamWaitEvent)(CUstream stream, CUevent event, unsigned int flags);
typedef CUresult (*PFN_cuEventCreate)(CUevent* event, unsigned int flags);
typedef CUresult (*PFN_cuEventDestroy_v2)(CUevent event);
typedef CUresult (*PFN_cuEventRecord)(CUevent event, CUstream stream);
typedef CUresult (*PFN_cuEventQuery)(CUevent event);
typedef CUresult (*PFN_cuEventSynchronize)(CUevent event);
typedef CUresult (*PFN_cuGetErrorName)(CUresult error, const char** name);
typedef CUresult (*PFN_cuGetErrorString)(CUresult error, const char** text);

#ifdef __cplusplus
}
#endif

#endif /* BLOB2GPU_CUDA_DRIVER_API_H */
