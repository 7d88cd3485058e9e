// ContentMd5Verifier: checks a blob against its Content-MD5 property (verify='auto' on a
// checkpoint without a manifest). MD5 runs over the bytes in file order while ranges land in any
// order: a range that arrives in turn is hashed at once, with any early ranges it unblocks; an
// early one waits, in place when its bytes stay put until the shard is finished (the cpu arena),
// else as a copy (a staging slot is reused as soon as its device copy is done). The last range
// to land completes the digest, before the shard's tensors are handed out.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "checksum.hpp"

namespace blob2gpu {

class ContentMd5Verifier {
 public:
  ContentMd5Verifier(std::string shard, uint64_t file_size, Md5::Digest expected);

  // File bytes [file_offset, file_offset + n) at `data`; `stays`: they remain valid at `data`
  // until the shard is finished. Returns the mismatch message once the last byte has been hashed
  // and the digest differs; nullopt otherwise. Thread-safe.
  std::optional<std::string> add(uint64_t file_offset, const uint8_t* data, size_t n, bool stays);

 private:
  struct Early {
    const uint8_t* data;
    size_t n;
    std::unique_ptr<uint8_t[]> copy;
  };
  std::string shard_;
  uint64_t file_size_;
  Md5::Digest expected_;
  std::mutex mutex_;
  Md5 md5_;
  uint64_t next_ = 0;  // bytes hashed so far
  std::map<uint64_t, Early> early_;
};

}  // namespace blob2gpu
