// ShardFile: one local shard opened for positional reads (pread) by core threads, without the GIL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

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

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
  std::string label_;
};

}  // namespace blob2gpu
