// digest_file (file_digest.hpp): one pass over an open file, every checksum fed from one buffer.
#include "file_digest.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>

namespace blob2gpu {

namespace {
constexpr size_t kBufferBytes = 8u << 20;

std::string hex(const Sha256::Digest& d) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(d.size() * 2, '0');
  for (size_t i = 0; i < d.size(); ++i) {
    out[2 * i] = kDigits[d[i] >> 4];
    out[2 * i + 1] = kDigits[d[i] & 0xF];
  }
  return out;
}
}  // namespace

FileDigest digest_file(int fd, uint64_t chunk_bytes, bool sha256, bool md5) {
  FileDigest digest;
  std::optional<Sha256> sha;
  std::optional<Md5> md;
  if (sha256) sha.emplace();
  if (md5) md.emplace();
  const size_t buffer_bytes = static_cast<size_t>(std::min<uint64_t>(kBufferBytes, chunk_bytes));
  std::unique_ptr<uint8_t[]> buffer(new uint8_t[buffer_bytes]);
  uint32_t crc = 0;
  uint64_t in_chunk = 0;  // bytes of the current chunk fed to `crc`
  for (;;) {
    const size_t want =
        static_cast<size_t>(std::min<uint64_t>(buffer_bytes, chunk_bytes - in_chunk));
    const ssize_t got = pread(fd, buffer.get(), want, static_cast<off_t>(digest.size));
    if (got < 0) {
      if (errno == EINTR) continue;
      digest.error = errno;
      return digest;
    }
    if (got == 0) break;
    const size_t n = static_cast<size_t>(got);
    crc = crc32c(buffer.get(), n, crc);
    if (sha) sha->update(buffer.get(), n);
    if (md) md->update(buffer.get(), n);
    digest.size += n;
    in_chunk += n;
    if (in_chunk == chunk_bytes) {
      digest.chunk_crc32c.push_back(crc);
      crc = 0;
      in_chunk = 0;
    }
  }
  if (in_chunk > 0) digest.chunk_crc32c.push_back(crc);
  if (sha) digest.sha256_hex = hex(sha->finish());
  if (md) digest.md5 = md->finish();
  return digest;
}

}  // namespace blob2gpu
