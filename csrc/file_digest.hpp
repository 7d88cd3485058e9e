// digest_file: the checksums of an open file, read once by the core (the NVMe cache's read-back of
// an entry it wrote, `cache verify`, `cache warm`). Owns nothing: the caller owns the descriptor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "checksum.hpp"

namespace blob2gpu {

struct FileDigest {
  uint64_t size = 0;
  std::vector<uint32_t> chunk_crc32c;     // one per chunk_bytes of the file, the last one short
  std::optional<std::string> sha256_hex;  // when asked for
  std::optional<Md5::Digest> md5;         // when asked for
  int error = 0;                          // errno of a failed read (the digest is then partial)
};

// Reads `fd` from offset 0 to its end with pread (the descriptor's offset does not move) through a
// buffer of at most 8 MiB, whatever chunk_bytes is (a record's value, read from disk others may
// write); CRC32C per chunk_bytes (> 0), the whole file's SHA-256 and MD5 when asked. Blocks on
// the disk; call it without the GIL. A failed read sets `error` and stops.
FileDigest digest_file(int fd, uint64_t chunk_bytes, bool sha256, bool md5);

}  // namespace blob2gpu
