// The one table of safetensors dtypes: their width and their DLPack code.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

namespace blob2gpu {

enum class DType : uint8_t {
  BOOL,
  U8,
  I8,
  U16,
  I16,
  U32,
  I32,
  U64,
  I64,
  F16,
  BF16,
  F32,
  F64,
  C64,
  F8_E4M3,
  F8_E5M2,
  F8_E8M0,
  F8_E4M3FNUZ,
  F8_E5M2FNUZ,
  F6_E2M3,
  F6_E3M2,
  F4,
};

struct DTypeInfo {
  DType dtype;
  std::string_view name;  // as written in safetensors headers, e.g. "BF16"
  uint32_t bits;          // bits per element; 4 and 6 for the sub-byte float types
  uint8_t dlpack_code;    // DLDataTypeCode
  uint8_t dlpack_bits;    // DLDataType.bits
};

const DTypeInfo& dtype_info(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);
const std::vector<DTypeInfo>& dtype_table();

}  // namespace blob2gpu
