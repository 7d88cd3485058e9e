// ChunkVerifier: checks a shard's bytes against its manifest as they land, in any order and any
// range size. Each landed range contributes CRC32C pieces to the fixed-size manifest chunks it
// overlaps; when a chunk's pieces cover it, they are combined (crc32c_combine) and compared, so a
// corrupted byte is caught before its slot is copied to the device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace blob2gpu {

struct ChecksumFailure {
  uint64_t begin = 0;  // file offsets of the chunk
  uint64_t end = 0;
  uint32_t expected = 0;
  uint32_t actual = 0;
};

class ChunkVerifier {
 public:
  // expected[k] is the CRC32C of file bytes [k * chunk_bytes, min((k + 1) * chunk_bytes, size)).
  ChunkVerifier(std::string shard, uint64_t file_size, uint64_t chunk_bytes,
                std::vector<uint32_t> expected);

  // Accounts for file bytes [file_offset, file_offset + n) at `data`. Returns the failures of the
  // chunks this range completed (empty when they matched). Thread-safe.
  std::vector<ChecksumFailure> add(uint64_t file_offset, const uint8_t* data, size_t n);
  // Every chunk was covered and compared.
  bool complete() const;
  const std::string& shard() const { return shard_; }
  // "shard 'x': bytes [a, b) have CRC32C 0x.. but the manifest says 0x.."
  std::string describe(const ChecksumFailure& f) const;

 private:
  struct Piece {
    uint64_t offset;
    uint64_t length;
    uint32_t crc;
  };
  std::string shard_;
  uint64_t file_size_;
  uint64_t chunk_bytes_;
  std::vector<uint32_t> expected_;
  mutable std::mutex mutex_;
  std::vector<std::vector<Piece>> pieces_;  // per chunk, until it is complete
  std::vector<uint64_t> covered_;           // bytes seen per chunk
  size_t chunks_done_ = 0;
};

}  // namespace blob2gpu
