#include "tensor_export.hpp"

#include <cstring>

#include "errors.hpp"

namespace blob2gpu {

namespace {

// Owns everything a DLPack consumer may read until it calls the deleter.
template <typename Managed>
struct ExportContext {
  Managed managed{};
  std::shared_ptr<DeviceArena> arena;
  std::vector<int64_t> shape;
};

// Called by the consumer, often from C++ (torch), where an exception cannot be caught: dropping
// the arena runs its teardown-form destructor, which never throws.
template <typename Managed>
void delete_export(Managed* self) noexcept {
  std::unique_ptr<ExportContext<Managed>> owner(
      static_cast<ExportContext<Managed>*>(self->manager_ctx));
}

DLTensor describe(const TensorView& view, std::vector<int64_t>& shape) {
  const DTypeInfo& info = dtype_info(view.dtype());
  DLTensor t{};
  t.data = reinterpret_cast<void*>(view.address());
  auto device = view.dlpack_device();
  t.device = {device.first, device.second};
  t.ndim = static_cast<int32_t>(shape.size());
  t.dtype = {info.dlpack_code, info.dlpack_bits, 1};
  t.shape = shape.empty() ? nullptr : shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
  return t;
}

}  // namespace

TensorView::TensorView(std::string name, DType dtype, std::vector<int64_t> shape,
                       std::shared_ptr<DeviceArena> arena, uint64_t offset, uint64_t nbytes)
    : name_(std::move(name)),
      dtype_(dtype),
      shape_(std::move(shape)),
      arena_(std::move(arena)),
      offset_(offset),
      nbytes_(nbytes) {}

std::pair<int32_t, int32_t> TensorView::dlpack_device() const {
  if (arena_->on_cuda()) return {kDLCUDA, arena_->context()->ordinal()};
  return {kDLCPU, 0};
}

void TensorView::make_stream_wait(CUstream stream) const {
  for (const auto& event : arena_->fence()) {
    if (!event->is_complete()) event->make_stream_wait(stream);
  }
}

void TensorView::note_consumer(CUstream stream) const {
  // The per-thread default stream names another stream in each thread, so it names none where
  // the arena goes (the deleter's thread).
  if (stream == nullptr || stream == BLOB2GPU_CU_STREAM_PER_THREAD) {
    arena_->note_unnamed_consumer();
  } else {
    arena_->note_consumer(stream);
  }
}

void TensorView::wait_ready() const {
  for (const auto& event : arena_->fence()) event->synchronize();
}

std::shared_ptr<TensorView> TensorView::as_bytes() const {
  const DTypeInfo& info = dtype_info(dtype_);
  std::vector<int64_t> shape;
  if (info.bits % 8 == 0 && !shape_.empty()) {
    shape = shape_;
    shape.back() *= static_cast<int64_t>(info.bits / 8);
  } else {
    shape = {static_cast<int64_t>(nbytes_)};
  }
  return std::make_shared<TensorView>(name_, DType::U8, std::move(shape), arena_, offset_, nbytes_);
}

std::shared_ptr<TensorView> TensorView::to_host() const {
  auto host = DeviceArena::on_host(nbytes_, "tensor '" + name_ + "'");
  if (!arena_->on_cuda()) {
    if (nbytes_) std::memcpy(host->host_data(), reinterpret_cast<const void*>(address()), nbytes_);
  } else if (nbytes_) {
    const auto& ctx = arena_->context();
    ScopedContext bind(*ctx);
    CudaStream stream(ctx);
    make_stream_wait(stream.handle());
    const CudaDriver& d = cuda_driver();
    check_cuda(d.cuMemcpyDtoHAsync(host->host_data(), address(), nbytes_, stream.handle()),
               "tensor '" + name_ + "': cuMemcpyDtoHAsync");
    // Waited on through a blocking-sync event, not cuStreamSynchronize, which spins the thread
    // under the primary context's default scheduling.
    CudaEvent copied(ctx);
    copied.record(stream.handle());
    copied.synchronize();
  }
  return std::make_shared<TensorView>(name_, dtype_, shape_, std::move(host), 0, nbytes_);
}

DLManagedTensorVersioned* TensorView::to_dlpack_versioned(uint64_t flags) const {
  auto ctx = std::make_unique<ExportContext<DLManagedTensorVersioned>>();
  ctx->arena = arena_;
  ctx->shape = shape_;
  DLManagedTensorVersioned& m = ctx->managed;
  m.version = {kDLPackMajor, kDLPackMinor};
  m.flags = flags;
  m.dl_tensor = describe(*this, ctx->shape);
  m.deleter = &delete_export<DLManagedTensorVersioned>;
  m.manager_ctx = ctx.get();
  return &ctx.release()->managed;
}

DLManagedTensor* TensorView::to_dlpack_legacy() const {
  auto ctx = std::make_unique<ExportContext<DLManagedTensor>>();
  ctx->arena = arena_;
  ctx->shape = shape_;
  DLManagedTensor& m = ctx->managed;
  m.dl_tensor = describe(*this, ctx->shape);
  m.deleter = &delete_export<DLManagedTensor>;
  m.manager_ctx = ctx.get();
  return &ctx.release()->managed;
}

}  // namespace blob2gpu
