// The DLPack ABI (v1.1), declared here from the DLPack specification so that the core has no
// third-party headers. Layouts must match the spec exactly: consumers read these structs.
#pragma once

#include <cstdint>

extern "C" {

struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};

enum DLDeviceType : int32_t {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
};

struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};

struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};

struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned* self);
  uint64_t flags;
  DLTensor dl_tensor;
};

}  // extern "C"

namespace blob2gpu {
constexpr uint32_t kDLPackMajor = 1;
constexpr uint32_t kDLPackMinor = 1;
constexpr uint64_t kDLPackFlagReadOnly = 1ULL << 0;
constexpr uint64_t kDLPackFlagIsCopied = 1ULL << 1;
constexpr uint8_t kDLUInt = 1;
}  // namespace blob2gpu
