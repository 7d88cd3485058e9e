#include "dtype.hpp"

#include <array>
#include <cstddef>

namespace blob2gpu {
namespace {

// DLDataTypeCode values from dlpack.h (v1.1), spelled out so the core does not need the header.
constexpr uint8_t kDLInt = 0;
constexpr uint8_t kDLUInt = 1;
constexpr uint8_t kDLFloat = 2;
constexpr uint8_t kDLBfloat = 4;
constexpr uint8_t kDLComplex = 5;
constexpr uint8_t kDLBool = 6;
constexpr uint8_t kDLFloat8_e4m3fn = 10;
constexpr uint8_t kDLFloat8_e4m3fnuz = 11;
constexpr uint8_t kDLFloat8_e5m2 = 12;
constexpr uint8_t kDLFloat8_e5m2fnuz = 13;
constexpr uint8_t kDLFloat8_e8m0fnu = 14;
constexpr uint8_t kDLFloat6_e2m3fn = 15;
constexpr uint8_t kDLFloat6_e3m2fn = 16;
constexpr uint8_t kDLFloat4_e2m1fn = 17;

constexpr DTypeInfo entry(DType dtype, std::string_view name, uint32_t bits, uint8_t code) {
  // DLPack describes every one of these types by its own width, sub-byte ones included.
  return DTypeInfo{dtype, name, bits, code, static_cast<uint8_t>(bits)};
}

// Rows are in DType enumerator order so dtype_info() can index by value (checked below).
constexpr std::array<DTypeInfo, 22> kTable = {{
    entry(DType::BOOL, "BOOL", 8, kDLBool),
    entry(DType::U8, "U8", 8, kDLUInt),
    entry(DType::I8, "I8", 8, kDLInt),
    entry(DType::U16, "U16", 16, kDLUInt),
    entry(DType::I16, "I16", 16, kDLInt),
    entry(DType::U32, "U32", 32, kDLUInt),
    entry(DType::I32, "I32", 32, kDLInt),
    entry(DType::U64, "U64", 64, kDLUInt),
    entry(DType::I64, "I64", 64, kDLInt),
    entry(DType::F16, "F16", 16, kDLFloat),
    entry(DType::BF16, "BF16", 16, kDLBfloat),
    entry(DType::F32, "F32", 32, kDLFloat),
    entry(DType::F64, "F64", 64, kDLFloat),
    entry(DType::C64, "C64", 64, kDLComplex),
    entry(DType::F8_E4M3, "F8_E4M3", 8, kDLFloat8_e4m3fn),
    entry(DType::F8_E5M2, "F8_E5M2", 8, kDLFloat8_e5m2),
    entry(DType::F8_E8M0, "F8_E8M0", 8, kDLFloat8_e8m0fnu),
    entry(DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8, kDLFloat8_e4m3fnuz),
    entry(DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8, kDLFloat8_e5m2fnuz),
    entry(DType::F6_E2M3, "F6_E2M3", 6, kDLFloat6_e2m3fn),
    entry(DType::F6_E3M2, "F6_E3M2", 6, kDLFloat6_e3m2fn),
    entry(DType::F4, "F4", 4, kDLFloat4_e2m1fn),
}};

constexpr bool table_in_enum_order() {
  for (size_t i = 0; i < kTable.size(); ++i) {
    if (static_cast<size_t>(kTable[i].dtype) != i) return false;
  }
  return static_cast<size_t>(DType::F4) + 1 == kTable.size();
}
static_assert(table_in_enum_order(), "kTable rows must follow the DType enumerators one to one");

}  // namespace

const DTypeInfo& dtype_info(DType dtype) {
  return kTable[static_cast<size_t>(dtype)];
}

std::optional<DType> dtype_from_name(std::string_view name) {
  // 22 short names: a linear scan costs less than hashing the lookup key.
  for (const DTypeInfo& info : kTable) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

const std::vector<DTypeInfo>& dtype_table() {
  static const std::vector<DTypeInfo> table(kTable.begin(), kTable.end());
  return table;
}

}  // namespace blob2gpu
