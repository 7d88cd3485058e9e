// Strict parsing of a safetensors shard header, following the reference implementation's rules.
// Every violation throws CoreError with a kind from the Header* / Invalid* family and a message
// that names the shard and, where there is one, the tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dtype.hpp"

namespace blob2gpu {

constexpr uint64_t kHeaderLengthBytes = 8;
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct TensorEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin;  // offset in the data region
  uint64_t end;
};

struct ShardHeader {
  uint64_t header_bytes = 0;         // N, the JSON length
  uint64_t data_offset = 0;          // 8 + N: where the data region starts in the file
  uint64_t data_bytes = 0;           // size of the data region
  std::vector<TensorEntry> tensors;  // sorted by begin (file order)
  std::vector<std::pair<std::string, std::string>> metadata;  // __metadata__, in file order
};

// Reads the little-endian header length from the first 8 bytes of a shard and checks it against
// the cap and the file size. Throws HeaderTruncated or HeaderTooLarge.
uint64_t read_header_length(const uint8_t* prefix, size_t prefix_len, uint64_t file_size,
                            const std::string& shard);

// Parses and validates the JSON header (json_len == N bytes that follow the length). file_size is
// the whole shard's size, used to check that the offsets cover the data region exactly.
ShardHeader parse_header(const uint8_t* json, size_t json_len, uint64_t file_size,
                         const std::string& shard);

}  // namespace blob2gpu
