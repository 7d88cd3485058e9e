// TensorView: one tensor of a loaded shard, a view into its DeviceArena, and its DLPack export.
// The view keeps the arena alive; so does every capsule made from it, so a consumer can drop the
// view and keep the tensor.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "device_arena.hpp"
#include "dlpack.hpp"
#include "dtype.hpp"

namespace blob2gpu {

class TensorView {
 public:
  TensorView(std::string name, DType dtype, std::vector<int64_t> shape,
             std::shared_ptr<DeviceArena> arena, uint64_t offset, uint64_t nbytes);

  const std::string& name() const { return name_; }
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  uint64_t nbytes() const { return nbytes_; }
  uint64_t address() const { return arena_->address() + offset_; }
  bool on_cuda() const { return arena_->on_cuda(); }
  // (DLDeviceType, device id)
  std::pair<int32_t, int32_t> dlpack_device() const;

  // Makes a consumer stream wait (on the device) until this tensor's bytes have landed.
  void make_stream_wait(CUstream stream) const;
  // The consumer imported this tensor on `stream` (null: it named none, stream=-1): see
  // DeviceArena::note_consumer.
  void note_consumer(CUstream stream) const;
  // Blocks the calling thread until this tensor's bytes have landed (waits on its events only).
  void wait_ready() const;

  // A uint8 view of the same bytes: shape[:-1] + [shape[-1] * element bytes] for byte-sized
  // dtypes, [nbytes] for the sub-byte ones.
  std::shared_ptr<TensorView> as_bytes() const;
  // A copy in host memory (a device-to-host copy on a private stream for CUDA tensors).
  std::shared_ptr<TensorView> to_host() const;

  // DLPack capsule payloads; the caller owns the result until it hands it to a consumer.
  DLManagedTensorVersioned* to_dlpack_versioned(uint64_t flags) const;
  DLManagedTensor* to_dlpack_legacy() const;

 private:
  std::string name_;
  DType dtype_;
  std::vector<int64_t> shape_;
  std::shared_ptr<DeviceArena> arena_;
  uint64_t offset_;
  uint64_t nbytes_;
};

}  // namespace blob2gpu
