// RAII owners for the CUDA driver objects the pipeline uses: a device's primary context (shared with
// PyTorch and CuPy, so pointers and streams interoperate), streams and events.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "shim/cuda_driver.hpp"

namespace blob2gpu {

// The primary context of one device, retained for this object's life.
class CudaContext {
 public:
  // Throws CudaDriverUnavailable when no driver loads, InvalidArgument for an ordinal out of range.
  static std::shared_ptr<CudaContext> retain(int ordinal);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int ordinal() const { return ordinal_; }
  CUcontext handle() const { return ctx_; }
  const std::string& name() const { return name_; }
  size_t total_bytes() const { return total_bytes_; }
  // Free and total device memory now (cuMemGetInfo).
  std::pair<size_t, size_t> memory_info() const;

 private:
  CudaContext(int ordinal, CUdevice device, CUcontext ctx, std::string name, size_t total);
  int ordinal_;
  CUdevice device_;
  CUcontext ctx_;
  std::string name_;
  size_t total_bytes_;
};

// Makes a context current on the calling thread for the scope, restoring the previous one after.
class ScopedContext {
 public:
  explicit ScopedContext(const CudaContext& ctx);
  ~ScopedContext();
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;

 private:
  CUcontext previous_ = nullptr;
  bool changed_ = false;
};

class CudaStream {
 public:
  explicit CudaStream(std::shared_ptr<CudaContext> ctx);  // non-blocking w.r.t. the legacy stream
  ~CudaStream();
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  CUstream handle() const { return stream_; }

 private:
  std::shared_ptr<CudaContext> ctx_;
  CUstream stream_ = nullptr;
};

class CudaEvent {
 public:
  explicit CudaEvent(std::shared_ptr<CudaContext> ctx);  // timing disabled: cheapest to record
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  CUevent handle() const { return event_; }
  void record(CUstream stream);
  bool is_complete() const;  // cuEventQuery; throws on errors other than NOT_READY
  void synchronize() const;  // waits for this event only, never for the whole device
  // Makes `stream` wait for this event on the device (cuStreamWaitEvent), without blocking the host.
  void make_stream_wait(CUstream stream) const;

 private:
  std::shared_ptr<CudaContext> ctx_;
  CUevent event_ = nullptr;
};

}  // namespace blob2gpu
