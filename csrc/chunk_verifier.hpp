// ChunkVerifier: checks a shard's bytes against its manifest as they land, in any order and any
// range size, chunk by fixed-size chunk, with one of two algorithms:
//  - CRC32C: each landed range contributes CRC pieces to the chunks it overlaps; when a chunk's
//    pieces cover it they are combined (crc32c_combine) and compared. No byte is kept.
//  - SHA-256 (verify='sha256'): a chunk inside one landed range is hashed in place; the parts of
//    a chunk split across ranges are copied into a chunk buffer, hashed once it is whole, and the
//    buffer freed. Only chunks cut by range boundaries are copied.
// Either way a corrupted byte is caught before its slot is copied to the device.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace blob2gpu {

// A shard's expected checksums, from its manifest (or its cache entry): one per chunk_bytes chunk
// of the file, the last chunk shorter. SHA-256 digests when given (verify='sha256'), else CRC32Cs.
struct ChunkChecksums {
  uint64_t chunk_bytes = 0;
  std::vector<uint32_t> crc32c;
  std::vector<std::array<uint8_t, 32>> sha256;

  bool empty() const { return crc32c.empty() && sha256.empty(); }
};

struct ChecksumFailure {
  uint64_t begin = 0;  // file offsets of the chunk
  uint64_t end = 0;
  std::string expected;  // printable: 0x%08x for CRC32C, 64 hex digits for SHA-256
  std::string actual;
};

class ChunkVerifier {
 public:
  using Digest = std::array<uint8_t, 32>;
  // CRC32C: expected_crc[k] is the CRC32C of file bytes [k * chunk_bytes, min((k + 1) *
  // chunk_bytes, size)). SHA-256 when expected_sha is given (one digest per chunk; the CRCs are
  // then not needed).
  ChunkVerifier(std::string shard, uint64_t file_size, uint64_t chunk_bytes,
                std::vector<uint32_t> expected_crc, std::vector<Digest> expected_sha = {});
  ~ChunkVerifier();

  // Accounts for file bytes [file_offset, file_offset + n) at `data`. Returns the failures of the
  // chunks this range completed (empty when they matched). Thread-safe.
  std::vector<ChecksumFailure> add(uint64_t file_offset, const uint8_t* data, size_t n);
  // Every chunk was covered and compared.
  bool complete() const;
  const std::string& shard() const { return shard_; }
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  bool sha256() const { return !expected_sha_.empty(); }
  // "shard 'x': bytes [a, b) have CRC32C 0x.. but the manifest says 0x.."
  std::string describe(const ChecksumFailure& f) const;

 private:
  struct Piece {
    uint64_t offset;
    uint64_t length;
    uint32_t crc;
  };
  // The part of a landed range that falls in one chunk.
  struct ChunkPiece {
    uint64_t chunk = 0;
    uint64_t chunk_begin = 0;  // file offsets of the chunk
    uint64_t chunk_end = 0;
    uint64_t offset = 0;  // file offset of the piece
    uint64_t length = 0;
    const uint8_t* data = nullptr;
  };
  void add_crc(const ChunkPiece& piece, std::vector<ChecksumFailure>& failures);
  void add_sha(const ChunkPiece& piece, std::vector<ChecksumFailure>& failures);
  void check_sha(uint64_t chunk, const uint8_t* bytes, size_t n,
                 std::vector<ChecksumFailure>& failures) const;

  std::string shard_;
  uint64_t file_size_;
  uint64_t chunk_bytes_;
  std::vector<uint32_t> expected_;
  std::vector<Digest> expected_sha_;
  mutable std::mutex mutex_;
  std::vector<std::vector<Piece>> pieces_;           // CRC: per chunk, until it is complete
  std::vector<std::unique_ptr<uint8_t[]>> buffers_;  // SHA-256: split chunks being assembled
  std::vector<uint64_t> covered_;                    // bytes seen per chunk
  size_t chunks_done_ = 0;
};

}  // namespace blob2gpu
