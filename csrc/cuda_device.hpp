// RAII owners for the CUDA driver objects the pipeline uses: a device's primary context (shared
// with PyTorch and CuPy, so pointers and streams interoperate), streams and events. Destructors
// never throw: they use ScopedContext's teardown form and count failures (teardown_failures.hpp).
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <string>

#include "shim/cuda_driver.hpp"

namespace blob2gpu {

// The primary context of one device.
class CudaContext {
 public:
  // The device's primary context, retained once and kept for the life of the process (never
  // released: see cuda_device.cpp). Every load to the device shares it. Throws
  // CudaDriverUnavailable when no driver loads, InvalidArgument for an ordinal out of range.
  static std::shared_ptr<CudaContext> primary(int ordinal);
  // For a probe of a device the process may never load to (preflight): the process-wide context
  // when there is one, otherwise one retained for this object's life only, so checking eight GPUs
  // does not leave eight contexts (each holds device memory) in the caller's process.
  static std::shared_ptr<CudaContext> probe(int ordinal);
  ~CudaContext();  // releases a probe's own retain; never throws
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int ordinal() const { return ordinal_; }
  CUcontext handle() const { return ctx_; }
  const std::string& name() const { return name_; }
  size_t total_bytes() const { return total_bytes_; }
  // Free and total device memory now (cuMemGetInfo).
  std::pair<size_t, size_t> memory_info() const;

 private:
  static std::shared_ptr<CudaContext> retain(int ordinal, bool release_on_destroy);
  CudaContext(int ordinal, CUdevice device, CUcontext ctx, std::string name, size_t total,
              bool release_on_destroy);
  int ordinal_;
  CUdevice device_;
  CUcontext ctx_;
  std::string name_;
  size_t total_bytes_;
  bool release_on_destroy_;
};

// Ordinal of the device whose context is current on the calling thread (cuCtxGetDevice), or -1
// when no context is current or no driver loads. Never throws. What device="cuda" means when the
// caller's framework has no current device of its own.
int current_device_ordinal() noexcept;

// Makes a context current on the calling thread for the scope, restoring the previous one after.
class ScopedContext {
 public:
  // Throws CudaError when the context cannot be made current.
  explicit ScopedContext(const CudaContext& ctx);
  // The teardown form, for destructors and deleters: never throws. When the context cannot be made
  // current the failure is counted (teardown_failures) and bound() is false; in a forked child
  // nothing is attempted (the parent's objects are not the child's to free) and bound() is false.
  // Either way the caller skips its driver calls and leaves the resource to the driver.
  ScopedContext(const CudaContext& ctx, std::nothrow_t) noexcept;
  ~ScopedContext();
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;

  bool bound() const { return bound_; }

 private:
  CUcontext previous_ = nullptr;
  bool changed_ = false;
  bool bound_ = false;
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

// Flags of every event the core creates. Timing disabled: cheapest to record. Blocking sync: a
// thread in cuEventSynchronize sleeps until the event completes; without it the driver spins the
// waiting thread (the reaper waits on every slot), one core pegged per load in a CPU-limited pod.
constexpr unsigned kCudaEventFlags = CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC;

class CudaEvent {
 public:
  explicit CudaEvent(std::shared_ptr<CudaContext> ctx);  // kCudaEventFlags
  // The teardown form of the constructor, for destructors and deleters: the caller has bound the
  // context (ScopedContext's teardown form); null when the driver refuses (counted, not thrown).
  static std::shared_ptr<CudaEvent> create_for_teardown(std::shared_ptr<CudaContext> ctx) noexcept;
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  CUevent handle() const { return event_; }
  void record(CUstream stream);
  bool is_complete() const;  // cuEventQuery; throws on errors other than NOT_READY
  void synchronize() const;  // waits (asleep) for this event only, never for the whole device
  // The teardown form of synchronize: the caller has bound the context (ScopedContext's teardown
  // form); a failure is counted, never thrown.
  void synchronize_for_teardown() const noexcept;
  // The teardown form of record(): false (the failure counted) when the driver refuses.
  bool record_for_teardown(CUstream stream) noexcept;
  // Whether the event has completed, never throwing: false when it has not or the driver cannot
  // tell (binds the context for the query).
  bool completed_for_teardown() const noexcept;
  // Makes `stream` wait for this event on the device (cuStreamWaitEvent), without blocking the
  // host.
  void make_stream_wait(CUstream stream) const;

 private:
  struct Unmade {};
  CudaEvent(std::shared_ptr<CudaContext> ctx, Unmade) : ctx_(std::move(ctx)) {}
  std::shared_ptr<CudaContext> ctx_;
  CUevent event_ = nullptr;
};

}  // namespace blob2gpu
