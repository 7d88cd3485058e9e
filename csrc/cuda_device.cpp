#include "cuda_device.hpp"

#include <pthread.h>

#include <mutex>
#include <utility>
#include <vector>

#include "errors.hpp"
#include "teardown_failures.hpp"

namespace blob2gpu {

namespace {

// Keeps a T for the whole process without ever running its destructor (see primary_contexts()).
template <typename T>
class ProcessLifetime {
 public:
  ProcessLifetime() { ::new (static_cast<void*>(storage_)) T(); }
  T& get() { return *std::launder(reinterpret_cast<T*>(storage_)); }

 private:
  alignas(T) unsigned char storage_[sizeof(T)];
};

// One retained primary context per device, for the life of the process. Releasing the last retain
// makes the driver destroy the context, and the next load rebuilds it (hundreds of ms, more without
// persistence mode), so a retain per load tore the context down after every load whose tensors
// were dropped, in any process where no framework held it. The retain is deliberately never
// released, not even at exit: static destructors run after the driver may have started its own
// shutdown (CUDA_ERROR_DEINITIALIZED) and while tensors a consumer still holds live in the context,
// and the driver reclaims every context of a process when it ends. For the same reason the
// registry itself is never destroyed: a daemon thread may still look a context up during exit.
struct PrimaryContexts {
  std::mutex mutex;
  std::vector<std::shared_ptr<CudaContext>> by_ordinal;  // null until first used
};

PrimaryContexts& primary_contexts() {
  static ProcessLifetime<PrimaryContexts> registry;
  return registry.get();
}

// fork() copies only the calling thread: a lock another thread held at that moment stays locked in
// the child forever, and the child's first CUDA call (even one that only reports that CUDA cannot
// be used in a forked child) would wait on it. So the registry's mutex and the driver's loading
// mutex are taken before every fork (in this order, the order the code nests them) and released
// after it in the parent and in the child.
void before_fork() {
  primary_contexts().mutex.lock();
  hold_driver_load_for_fork();
}

void after_fork() {
  release_driver_load_after_fork();
  primary_contexts().mutex.unlock();
}

[[maybe_unused]] const bool g_fork_handlers = [] {
  pthread_atfork(&before_fork, &after_fork, &after_fork);
  return true;
}();

}  // namespace

std::shared_ptr<CudaContext> CudaContext::retain(int ordinal, bool release_on_destroy) {
  const CudaDriver& d = cuda_driver();
  int count = 0;
  check_cuda(d.cuDeviceGetCount(&count), "cuDeviceGetCount");
  if (count == 0) {
    throw CoreError(ErrorKind::CudaDriverUnavailable,
                    "the CUDA driver '" + d.path + "' reports no GPU", {}, -1,
                    static_cast<int>(DriverStatus::NoDevice));
  }
  if (ordinal < 0 || ordinal >= count) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "device cuda:" + std::to_string(ordinal) + " does not exist: this host has " +
                        std::to_string(count) +
                        " GPU(s), cuda:0 to cuda:" + std::to_string(count - 1));
  }
  CUdevice device = 0;
  check_cuda(d.cuDeviceGet(&device, ordinal), "cuDeviceGet");
  char name[256] = {0};
  check_cuda(d.cuDeviceGetName(name, sizeof(name) - 1, device), "cuDeviceGetName");
  size_t total = 0;
  check_cuda(d.cuDeviceTotalMem(&total, device), "cuDeviceTotalMem");
  CUcontext ctx = nullptr;
  check_cuda(d.cuDevicePrimaryCtxRetain(&ctx, device), "cuDevicePrimaryCtxRetain");
  return std::shared_ptr<CudaContext>(
      new CudaContext(ordinal, device, ctx, name, total, release_on_destroy));
}

namespace {
// The process's retained context of `ordinal`, or null; the caller holds the registry's mutex.
std::shared_ptr<CudaContext> retained_primary(const PrimaryContexts& registry, int ordinal) {
  if (ordinal < 0 || static_cast<size_t>(ordinal) >= registry.by_ordinal.size()) return nullptr;
  return registry.by_ordinal[ordinal];
}
}  // namespace

std::shared_ptr<CudaContext> CudaContext::primary(int ordinal) {
  PrimaryContexts& registry = primary_contexts();
  std::lock_guard<std::mutex> lock(registry.mutex);
  if (auto kept = retained_primary(registry, ordinal)) return kept;
  auto ctx = retain(ordinal, /*release_on_destroy=*/false);  // validates the ordinal
  if (registry.by_ordinal.size() <= static_cast<size_t>(ordinal)) {
    registry.by_ordinal.resize(ordinal + 1);
  }
  registry.by_ordinal[ordinal] = ctx;
  return ctx;
}

std::shared_ptr<CudaContext> CudaContext::probe(int ordinal) {
  {
    PrimaryContexts& registry = primary_contexts();
    std::lock_guard<std::mutex> lock(registry.mutex);
    if (auto kept = retained_primary(registry, ordinal)) return kept;
  }
  return retain(ordinal, /*release_on_destroy=*/true);
}

CudaContext::CudaContext(int ordinal, CUdevice device, CUcontext ctx, std::string name,
                         size_t total, bool release_on_destroy)
    : ordinal_(ordinal),
      device_(device),
      ctx_(ctx),
      name_(std::move(name)),
      total_bytes_(total),
      release_on_destroy_(release_on_destroy) {}

CudaContext::~CudaContext() {
  if (!release_on_destroy_ || cuda_driver_inherited_by_fork()) return;
  if (const CudaDriver* d = cuda_driver_if_loaded()) {
    check_teardown(d->cuDevicePrimaryCtxRelease(device_), "cuDevicePrimaryCtxRelease");
  }
}

std::pair<size_t, size_t> CudaContext::memory_info() const {
  ScopedContext bind(*this);
  size_t free_bytes = 0, total = 0;
  check_cuda(cuda_driver().cuMemGetInfo(&free_bytes, &total), "cuMemGetInfo");
  return {free_bytes, total};
}

int current_device_ordinal() noexcept {
  try {
    const CudaDriver& d = cuda_driver();
    CUcontext ctx = nullptr;
    if (d.cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || ctx == nullptr) return -1;
    CUdevice device = 0;
    if (d.cuCtxGetDevice(&device) != CUDA_SUCCESS) return -1;
    // A CUdevice is a handle, not promised to be the ordinal: find the ordinal that names it.
    int count = 0;
    if (d.cuDeviceGetCount(&count) != CUDA_SUCCESS) return -1;
    for (int ordinal = 0; ordinal < count; ++ordinal) {
      CUdevice candidate = 0;
      if (d.cuDeviceGet(&candidate, ordinal) == CUDA_SUCCESS && candidate == device) {
        return ordinal;
      }
    }
    return -1;
  } catch (...) {
    return -1;  // no driver: the caller's default applies, and the load reports the driver
  }
}

ScopedContext::ScopedContext(const CudaContext& ctx) {
  const CudaDriver& d = cuda_driver();
  check_cuda(d.cuCtxGetCurrent(&previous_), "cuCtxGetCurrent");
  if (previous_ != ctx.handle()) {
    check_cuda(d.cuCtxSetCurrent(ctx.handle()), "cuCtxSetCurrent");
    changed_ = true;
  }
  bound_ = true;
}

ScopedContext::ScopedContext(const CudaContext& ctx, std::nothrow_t) noexcept {
  const CudaDriver* d = cuda_driver_if_loaded();
  if (d == nullptr || cuda_driver_inherited_by_fork()) return;
  CUresult rc = d->cuCtxGetCurrent(&previous_);
  if (rc != CUDA_SUCCESS) {
    note_teardown_failure("cuCtxGetCurrent", rc);
    return;
  }
  if (previous_ != ctx.handle()) {
    rc = d->cuCtxSetCurrent(ctx.handle());
    if (rc != CUDA_SUCCESS) {
      note_teardown_failure("cuCtxSetCurrent", rc);
      return;
    }
    changed_ = true;
  }
  bound_ = true;
}

ScopedContext::~ScopedContext() {
  if (!changed_) return;
  if (const CudaDriver* d = cuda_driver_if_loaded()) {
    check_teardown(d->cuCtxSetCurrent(previous_), "cuCtxSetCurrent (restoring the caller's)");
  }
}

CudaStream::CudaStream(std::shared_ptr<CudaContext> ctx) : ctx_(std::move(ctx)) {
  ScopedContext bind(*ctx_);
  check_cuda(cuda_driver().cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
}

CudaStream::~CudaStream() {
  ScopedContext bind(*ctx_, std::nothrow);
  if (bind.bound()) {
    check_teardown(cuda_driver_if_loaded()->cuStreamDestroy(stream_), "cuStreamDestroy");
  }
}

CudaEvent::CudaEvent(std::shared_ptr<CudaContext> ctx) : ctx_(std::move(ctx)) {
  ScopedContext bind(*ctx_);
  check_cuda(cuda_driver().cuEventCreate(&event_, kCudaEventFlags), "cuEventCreate");
}

std::shared_ptr<CudaEvent> CudaEvent::create_for_teardown(
    std::shared_ptr<CudaContext> ctx) noexcept {
  const CudaDriver* d = cuda_driver_if_loaded();
  if (d == nullptr || cuda_driver_inherited_by_fork()) return nullptr;
  try {
    std::shared_ptr<CudaEvent> event(new CudaEvent(std::move(ctx), Unmade{}));
    const CUresult rc = d->cuEventCreate(&event->event_, kCudaEventFlags);
    if (rc != CUDA_SUCCESS) {
      event->event_ = nullptr;
      note_teardown_failure("cuEventCreate", rc);
      return nullptr;
    }
    return event;
  } catch (...) {  // std::bad_alloc
    return nullptr;
  }
}

CudaEvent::~CudaEvent() {
  if (event_ == nullptr) return;
  ScopedContext bind(*ctx_, std::nothrow);
  if (bind.bound()) {
    check_teardown(cuda_driver_if_loaded()->cuEventDestroy(event_), "cuEventDestroy");
  }
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

void CudaEvent::synchronize_for_teardown() const noexcept {
  if (const CudaDriver* d = cuda_driver_if_loaded()) {
    check_teardown(d->cuEventSynchronize(event_), "cuEventSynchronize");
  }
}

bool CudaEvent::record_for_teardown(CUstream stream) noexcept {
  const CudaDriver* d = cuda_driver_if_loaded();
  if (d == nullptr) return false;
  const CUresult rc = d->cuEventRecord(event_, stream);
  if (rc != CUDA_SUCCESS) note_teardown_failure("cuEventRecord", rc);
  return rc == CUDA_SUCCESS;
}

bool CudaEvent::completed_for_teardown() const noexcept {
  ScopedContext bind(*ctx_, std::nothrow);
  if (!bind.bound()) return false;
  return cuda_driver_if_loaded()->cuEventQuery(event_) == CUDA_SUCCESS;
}

void CudaEvent::make_stream_wait(CUstream stream) const {
  ScopedContext bind(*ctx_);
  check_cuda(cuda_driver().cuStreamWaitEvent(stream, event_, 0), "cuStreamWaitEvent");
}

}  // namespace blob2gpu
