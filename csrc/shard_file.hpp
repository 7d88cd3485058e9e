// ShardFile: one local shard opened for positional reads (pread) by core threads, without the GIL.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "errors.hpp"

namespace blob2gpu {

class ShardFile {
 public:
  // Throws SourceUnavailable naming the path and the OS reason.
  ShardFile(const std::string& path, const std::string& label);
  ~ShardFile();
  ShardFile(const ShardFile&) = delete;
  ShardFile& operator=(const ShardFile&) = delete;

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }
  // Reads exactly `bytes` at `offset`; throws SourceReadError naming the shard and the offset when
  // the read fails or the file ends early (it changed under the load).
  void read_exact(uint8_t* dst, size_t bytes, uint64_t offset) const;

  // O_DIRECT reads (page cache bypassed: an NVMe cache entry goes from the drive into the
  // staging slot once). open_direct() says whether the filesystem allows it.
  static constexpr uint64_t kDirectAlign = 4096;  // offset, length and buffer alignment
  bool open_direct();
  // Whether O_DIRECT reads are open and have not been refused.
  bool direct() const { return direct_fd_ >= 0 && !direct_refused_; }
  // Reads up to `bytes` at `offset` (both multiples of kDirectAlign, dst aligned too) with
  // O_DIRECT; returns the bytes read (fewer at the end of the file), or 0 when the kernel refused
  // the request (EINVAL, EFAULT, EOPNOTSUPP: the caller reads it buffered instead, and direct()
  // turns false). Throws SourceReadError on I/O errors.
  size_t read_direct(uint8_t* dst, size_t bytes, uint64_t offset) const;

 private:
  // SourceReadError for a failed pread ("read", "direct read"), with errno's reason.
  CoreError read_failed(const char* what, size_t bytes, uint64_t offset) const;

  // Whether errno from an O_DIRECT read means "not this way" rather than an I/O error.
  static bool direct_refusal(int error);

  int fd_ = -1;
  int direct_fd_ = -1;
  mutable std::atomic<bool> direct_refused_{false};  // read by every io thread
  std::string path_;
  uint64_t size_ = 0;
  std::string label_;
};

}  // namespace blob2gpu
