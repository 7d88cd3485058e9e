#include "chunk_verifier.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "checksum.hpp"
#include "errors.hpp"

namespace blob2gpu {

namespace {

std::string hex_crc(uint32_t crc) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08x", crc);
  return text;
}

std::string hex_digest(const ChunkVerifier::Digest& d) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (uint8_t b : d) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

}  // namespace

ChunkVerifier::ChunkVerifier(std::string shard, uint64_t file_size, uint64_t chunk_bytes,
                             std::vector<uint32_t> expected_crc, std::vector<Digest> expected_sha)
    : shard_(std::move(shard)),
      file_size_(file_size),
      chunk_bytes_(chunk_bytes),
      expected_(std::move(expected_crc)),
      expected_sha_(std::move(expected_sha)) {
  const uint64_t chunks = chunk_bytes_ ? (file_size_ + chunk_bytes_ - 1) / chunk_bytes_ : 0;
  const size_t listed = sha256() ? expected_sha_.size() : expected_.size();
  if (chunk_bytes_ == 0 || chunks != listed) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "shard '" + shard_ + "': the manifest lists " + std::to_string(listed) +
                        " chunk checksums but " + std::to_string(file_size_) +
                        " bytes in chunks of " + std::to_string(chunk_bytes_) + " need " +
                        std::to_string(chunks));
  }
  if (sha256()) {
    buffers_.resize(chunks);
  } else {
    pieces_.resize(chunks);
  }
  covered_.assign(chunks, 0);
}

ChunkVerifier::~ChunkVerifier() = default;

std::vector<ChecksumFailure> ChunkVerifier::add(uint64_t file_offset, const uint8_t* data,
                                                size_t n) {
  std::vector<ChecksumFailure> failures;
  const uint64_t end = file_offset + n;
  for (uint64_t pos = file_offset; pos < end;) {
    ChunkPiece piece;
    piece.chunk = pos / chunk_bytes_;
    piece.chunk_begin = piece.chunk * chunk_bytes_;
    piece.chunk_end = std::min(file_size_, piece.chunk_begin + chunk_bytes_);
    piece.offset = pos;
    piece.length = std::min(end, piece.chunk_end) - pos;
    piece.data = data + (pos - file_offset);
    if (sha256()) {
      add_sha(piece, failures);
    } else {
      add_crc(piece, failures);
    }
    pos += piece.length;
  }
  return failures;
}

void ChunkVerifier::add_crc(const ChunkPiece& p, std::vector<ChecksumFailure>& failures) {
  // The CRC itself runs outside the lock: several threads verify their slots at once.
  const uint32_t crc = crc32c(p.data, p.length);
  std::lock_guard<std::mutex> lock(mutex_);
  pieces_[p.chunk].push_back({p.offset, p.length, crc});
  covered_[p.chunk] += p.length;
  if (covered_[p.chunk] != p.chunk_end - p.chunk_begin) return;
  auto& pieces = pieces_[p.chunk];
  std::sort(pieces.begin(), pieces.end(),
            [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
  uint32_t whole = pieces.front().crc;
  for (size_t i = 1; i < pieces.size(); ++i) {
    whole = crc32c_combine(whole, pieces[i].crc, pieces[i].length);
  }
  if (whole != expected_[p.chunk]) {
    failures.push_back({p.chunk_begin, p.chunk_end, hex_crc(expected_[p.chunk]), hex_crc(whole)});
  }
  std::vector<Piece>().swap(pieces);
  ++chunks_done_;
}

void ChunkVerifier::check_sha(uint64_t chunk, const uint8_t* bytes, size_t n,
                              std::vector<ChecksumFailure>& failures) const {
  Sha256 sha;
  sha.update(bytes, n);
  const Digest actual = sha.finish();
  if (actual != expected_sha_[chunk]) {
    const uint64_t begin = chunk * chunk_bytes_;
    failures.push_back({begin, begin + n, hex_digest(expected_sha_[chunk]), hex_digest(actual)});
  }
}

void ChunkVerifier::add_sha(const ChunkPiece& p, std::vector<ChecksumFailure>& failures) {
  const uint64_t chunk_length = p.chunk_end - p.chunk_begin;
  if (p.length == chunk_length) {
    check_sha(p.chunk, p.data, chunk_length, failures);  // whole: hashed in place
    std::lock_guard<std::mutex> lock(mutex_);
    covered_[p.chunk] = chunk_length;
    ++chunks_done_;
    return;
  }
  std::unique_ptr<uint8_t[]> whole;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& buffer = buffers_[p.chunk];
    if (!buffer) buffer.reset(new uint8_t[chunk_length]);
    std::memcpy(buffer.get() + (p.offset - p.chunk_begin), p.data, p.length);
    covered_[p.chunk] += p.length;
    if (covered_[p.chunk] == chunk_length) {
      whole = std::move(buffer);
      ++chunks_done_;
    }
  }
  if (whole) check_sha(p.chunk, whole.get(), chunk_length, failures);
}

bool ChunkVerifier::complete() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return chunks_done_ == covered_.size();
}

std::string ChunkVerifier::describe(const ChecksumFailure& f) const {
  return "shard '" + shard_ + "': bytes [" + std::to_string(f.begin) + ", " +
         std::to_string(f.end) + ") have " + (sha256() ? "SHA-256 " : "CRC32C ") + f.actual +
         " but the manifest says " + f.expected +
         " (corrupted in storage, on the wire or in the cache); nothing from this load was kept";
}

}  // namespace blob2gpu
