#include "cuda_device.hpp"

#include <utility>

#include "errors.hpp"

namespace blob2gpu {

std::shared_ptr<CudaContext> CudaContext::retain(int ordinal) {
  const CudaDriver& d = cuda_driver();
  int count = 0;
  check_cuda(d.cuDeviceGetCount(&count), "cuDeviceGetCount");
  if (count == 0) {
    throw CoreError(ErrorKind::CudaDriverUnavailable,
                    "the CUDA driver '" + d.path + "' reports no GPU (use device='cpu')");
  }
  if (ordinal < 0 || ordinal >= count) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "device cuda:" + std::to_string(ordinal) + " does not exist: this host has " +
                        std::to_string(count) + " GPU(s), cuda:0 to cuda:" +
                        std::to_string(count - 1));
  }
  CUdevice device = 0;
  check_cuda(d.cuDeviceGet(&device, ordinal), "cuDeviceGet");
  char name[256] = {0};
  check_cuda(d.cuDeviceGetName(name, sizeof(name) - 1, device), "cuDeviceGetName");
  size_t total = 0;
  check_cuda(d.cuDeviceTotalMem(&total, device), "cuDeviceTotalMem");
  CUcontext ctx = nullptr;
  check_cuda(d.cuDevicePrimaryCtxRetain(&ctx, device), "cuDevicePrimaryCtxRetain");
  return std::shared_ptr<CudaContext>(new CudaContext(ordinal, device, ctx, name, total));
}

CudaContext::CudaContext(int ordinal, CUdevice device, CUcontext ctx, std::string name,
                         size_t total)
    : ordinal_(ordinal), device_(device), ctx_(ctx), name_(std::move(name)), total_bytes_(total) {}

CudaContext::~CudaContext() { cuda_driver().cuDevicePrimaryCtxRelease(device_); }

std::pair<size_t, size_t> CudaContext::memory_info() const {
  ScopedContext bind(*this);
  size_t free_bytes = 0, total = 0;
  check_cuda(cuda_driver().cuMemGetInfo(&free_bytes, &total), "cuMemGetInfo");
  return {free_bytes, total};
}

ScopedContext::ScopedContext(const CudaContext& ctx) {
  const CudaDriver& d = cuda_driver();
  check_cuda(d.cuCtxGetCurrent(&previous_), "cuCtxGetCurrent");
  if (previous_ != ctx.handle()) {
    check_cuda(d.cuCtxSetCurrent(ctx.handle()), "cuCtxSetCurrent");
    changed_ = true;
  }
}

ScopedContext::~ScopedContext() {
  if (changed_) cuda_driver().cuCtxSetCurrent(previous_);
}

CudaStream::CudaStream(std::shared_ptr<CudaContext> ctx) : ctx_(std::move(ctx)) {
  ScopedContext bind(*ctx_);
  check_cuda(cuda_driver().cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
}

CudaStream::~CudaStream() {
  ScopedContext bind(*ctx_);
  cuda_driver().cuStreamDestroy(stream_);
}

CudaEvent::CudaEvent(std::shared_ptr<CudaContext> ctx) : ctx_(std::move(ctx)) {
  ScopedContext bind(*ctx_);
  check_cuda(cuda_driver().cuEventCreate(&event_, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
}

CudaEvent::~CudaEvent() {
  ScopedContext bind(*ctx_);
  cuda_driver().cuEventDestroy(event_);
}

void CudaEvent::record(CUstream stream) {
  check_cuda(cuda_driver().cuEventRecord(event_, stream), "cuEventRecord");
}

bool CudaEvent::is_complete() const {
  ScopedContext bind(*ctx_);
  CUresult rc = cuda_driver().cuEventQuery(event_);
  if (rc == CUDA_ERROR_NOT_READY) return false;
  check_cuda(rc, "cuEventQuery");
  return true;
}

void CudaEvent::synchronize() const {
  ScopedContext bind(*ctx_);
  check_cuda(cuda_driver().cuEventSynchronize(event_), "cuEventSynchronize");
}

void CudaEvent::make_stream_wait(CUstream stream) const {
  ScopedContext bind(*ctx_);
  check_cuda(cuda_driver().cuStreamWaitEvent(stream, event_, 0), "cuStreamWaitEvent");
}

}  // namespace blob2gpu
