#include "chunk_verifier.hpp"

#include <algorithm>
#include <cstdio>

#include "checksum.hpp"
#include "errors.hpp"

namespace blob2gpu {

ChunkVerifier::ChunkVerifier(std::string shard, uint64_t file_size, uint64_t chunk_bytes,
                             std::vector<uint32_t> expected)
    : shard_(std::move(shard)),
      file_size_(file_size),
      chunk_bytes_(chunk_bytes),
      expected_(std::move(expected)) {
  const uint64_t chunks = chunk_bytes_ ? (file_size_ + chunk_bytes_ - 1) / chunk_bytes_ : 0;
  if (chunk_bytes_ == 0 || chunks != expected_.size()) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "shard '" + shard_ + "': the manifest lists " +
                        std::to_string(expected_.size()) + " chunk checksums but " +
                        std::to_string(file_size_) + " bytes in chunks of " +
                        std::to_string(chunk_bytes_) + " need " + std::to_string(chunks));
  }
  pieces_.resize(chunks);
  covered_.assign(chunks, 0);
}

std::vector<ChecksumFailure> ChunkVerifier::add(uint64_t file_offset, const uint8_t* data,
                                                size_t n) {
  std::vector<ChecksumFailure> failures;
  uint64_t pos = file_offset;
  const uint64_t end = file_offset + n;
  while (pos < end) {
    const uint64_t chunk = pos / chunk_bytes_;
    const uint64_t chunk_begin = chunk * chunk_bytes_;
    const uint64_t chunk_end = std::min(file_size_, chunk_begin + chunk_bytes_);
    const uint64_t piece_end = std::min(end, chunk_end);
    // The CRC itself runs outside the lock: several threads verify their slots at once.
    const uint32_t crc = crc32c(data + (pos - file_offset), piece_end - pos);
    std::lock_guard<std::mutex> lock(mutex_);
    pieces_[chunk].push_back({pos, piece_end - pos, crc});
    covered_[chunk] += piece_end - pos;
    if (covered_[chunk] == chunk_end - chunk_begin) {
      auto& pieces = pieces_[chunk];
      std::sort(pieces.begin(), pieces.end(),
                [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
      uint32_t whole = pieces.front().crc;
      for (size_t i = 1; i < pieces.size(); ++i) {
        whole = crc32c_combine(whole, pieces[i].crc, pieces[i].length);
      }
      if (whole != expected_[chunk]) {
        failures.push_back({chunk_begin, chunk_end, expected_[chunk], whole});
      }
      std::vector<Piece>().swap(pieces);
      ++chunks_done_;
    }
    pos = piece_end;
  }
  return failures;
}

bool ChunkVerifier::complete() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return chunks_done_ == expected_.size();
}

std::string ChunkVerifier::describe(const ChecksumFailure& f) const {
  char crcs[64];
  std::snprintf(crcs, sizeof(crcs), "0x%08x but the manifest says 0x%08x", f.actual, f.expected);
  return "shard '" + shard_ + "': bytes [" + std::to_string(f.begin) + ", " +
         std::to_string(f.end) + ") have CRC32C " + crcs +
         " (corrupted in storage, on the wire or in the cache); nothing from this load was kept";
}

}  // namespace blob2gpu
