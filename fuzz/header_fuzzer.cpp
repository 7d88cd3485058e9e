// libFuzzer target for the safetensors header parser (csrc/safetensors_header.*). The input is a
// whole shard file. Bad input must end in CoreError of a header kind whose message names the
// shard; anything else (another exception, a sanitizer report, a header that parses but breaks
// the format's layout rules) is a crash. Build and run with fuzz/run_fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <set>
#include <string>

#include "dtype.hpp"
#include "errors.hpp"
#include "safetensors_header.hpp"

namespace {

using blob2gpu::CoreError;
using blob2gpu::ErrorKind;
using blob2gpu::ShardHeader;

const std::string kShard = "fuzz.safetensors";

[[noreturn]] void violated(const char* what, const std::string& detail = "") {
  std::fprintf(stderr, "header_fuzzer: invariant violated: %s %s\n", what, detail.c_str());
  std::abort();
}

void require(bool holds, const char* what, const std::string& detail = "") {
  if (!holds) violated(what, detail);
}

// What a header that parsed must satisfy, checked independently of the parser's own code.
void check_invariants(const ShardHeader& h, uint64_t header_len, uint64_t file_size) {
  require(h.header_bytes == header_len, "header_bytes is the declared length");
  require(h.data_offset == blob2gpu::kHeaderLengthBytes + header_len, "data_offset is 8 + N");
  require(h.data_offset <= file_size, "the data region starts inside the file");
  require(h.data_bytes == file_size - h.data_offset, "data_bytes is the rest of the file");

  uint64_t expected_begin = 0;  // sorted and contiguous from 0: each tensor begins where the
  std::set<std::string> names;  // previous one ended
  for (const blob2gpu::TensorEntry& t : h.tensors) {
    require(t.begin == expected_begin, "tensors sorted and contiguous", t.name);
    require(t.begin <= t.end, "begin <= end", t.name);
    require(names.insert(t.name).second, "tensor names are unique", t.name);
    require(t.name != "__metadata__", "__metadata__ is not a tensor");

    const blob2gpu::DTypeInfo& info = blob2gpu::dtype_info(t.dtype);
    require(info.dtype == t.dtype && info.bits > 0, "dtype from the table", t.name);
    // numel x bits in 128 bits: no overflow in the check itself.
    unsigned __int128 bits = info.bits;
    bool zero = false;
    for (int64_t dim : t.shape) {
      require(dim >= 0, "dimensions are non-negative", t.name);
      if (dim == 0) zero = true;
      if (!zero) {
        bits *= static_cast<uint64_t>(dim);
        require(bits <= std::numeric_limits<uint64_t>::max(), "numel x bits fits in 64 bits",
                t.name);
      }
    }
    if (zero) bits = 0;
    require(bits % 8 == 0, "whole bytes", t.name);
    require(t.end - t.begin == static_cast<uint64_t>(bits / 8), "size == numel x bits / 8", t.name);
    expected_begin = t.end;
  }
  require(expected_begin == h.data_bytes, "tensors cover data_bytes exactly");

  std::set<std::string> keys;
  for (const auto& kv : h.metadata) require(keys.insert(kv.first).second, "metadata keys unique");
}

bool is_header_kind(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::HeaderTooLarge:
    case ErrorKind::HeaderTruncated:
    case ErrorKind::HeaderNotUtf8:
    case ErrorKind::HeaderNotJson:
    case ErrorKind::InvalidTensorEntry:
    case ErrorKind::UnknownDType:
    case ErrorKind::InvalidShape:
    case ErrorKind::InvalidOffsets:
    case ErrorKind::TensorSizeMismatch:
    case ErrorKind::DuplicateTensor:
    case ErrorKind::InvalidMetadata:
      return true;
    default:
      return false;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const uint64_t file_size = size;
  try {
    const uint64_t header_len = blob2gpu::read_header_length(data, size, file_size, kShard);
    // read_header_length promises that the whole header is inside the file.
    require(blob2gpu::kHeaderLengthBytes + header_len <= size, "header inside the file");
    const ShardHeader header = blob2gpu::parse_header(
        data + blob2gpu::kHeaderLengthBytes, static_cast<size_t>(header_len), file_size, kShard);
    check_invariants(header, header_len, file_size);
  } catch (const CoreError& e) {
    require(is_header_kind(e.kind()), "a header error kind", blob2gpu::error_kind_name(e.kind()));
    const std::string message = e.what();
    require(message.rfind("shard '" + kShard + "': ", 0) == 0, "the message names the shard",
            message);
  }
  return 0;
}
