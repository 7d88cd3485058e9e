#include "shard_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "errors.hpp"

namespace blob2gpu {

ShardFile::ShardFile(const std::string& path, const std::string& label)
    : path_(path), label_(label) {
  // O_NONBLOCK: a FIFO in a shard's place is refused below instead of blocking the open (no
  // effect on the reads of a regular file).
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) {
    throw CoreError(ErrorKind::SourceUnavailable,
                    "shard '" + label + "': cannot open '" + path + "': " + std::strerror(errno),
                    label);
  }
  struct stat st{};
  if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    int err = errno;
    ::close(fd_);
    fd_ = -1;
    throw CoreError(ErrorKind::SourceUnavailable,
                    "shard '" + label + "': '" + path + "' is not a readable regular file" +
                        (err ? std::string(": ") + std::strerror(err) : std::string()),
                    label);
  }
  size_ = static_cast<uint64_t>(st.st_size);
  // The pipeline reads each shard once, front to back in large chunks.
  ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
}

ShardFile::~ShardFile() {
  if (fd_ >= 0) ::close(fd_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
}

bool ShardFile::open_direct() {
#ifdef O_DIRECT
  if (direct_fd_ < 0) direct_fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
#endif
  return direct_fd_ >= 0;
}

CoreError ShardFile::read_failed(const char* what, size_t bytes, uint64_t offset) const {
  return CoreError(ErrorKind::SourceReadError,
                   "shard '" + label_ + "': " + what + " of " + std::to_string(bytes) +
                       " bytes at offset " + std::to_string(offset) +
                       " failed: " + std::strerror(errno),
                   label_, static_cast<int64_t>(offset));
}

bool ShardFile::direct_refusal(int error) {
  switch (error) {
    case EINVAL:  // an alignment the device or filesystem does not take
    case EFAULT:  // the kernel could not pin the destination for DMA (memory the GPU driver
                  // mapped itself may be such memory: cuMemHostAlloc slots, unverified on a GPU)
    case EOPNOTSUPP:  // the filesystem takes O_DIRECT at open() but not for this read
      return true;
    default:
      return false;  // EIO and the rest: a buffered read would not fare better; raised
  }
}

size_t ShardFile::read_direct(uint8_t* dst, size_t bytes, uint64_t offset) const {
  size_t done = 0;
  while (done < bytes) {
    ssize_t n = ::pread(direct_fd_, dst + done, bytes - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (direct_refusal(errno)) {
        // Not an I/O error: O_DIRECT cannot serve this file or this buffer. The caller reads the
        // range buffered, and so does every later read of the file (no failing call per slot).
        direct_refused_ = true;
        return 0;
      }
      throw read_failed("direct read", bytes, offset + done);
    }
    if (n == 0) break;  // end of file
    done += static_cast<size_t>(n);
    if (done % kDirectAlign != 0) break;  // a short read ends the file (or the caller falls back)
  }
  return done;
}

void ShardFile::read_exact(uint8_t* dst, size_t bytes, uint64_t offset) const {
  size_t done = 0;
  while (done < bytes) {
    ssize_t n = ::pread(fd_, dst + done, bytes - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw read_failed("read", bytes, offset + done);
    }
    if (n == 0) {
      throw CoreError(ErrorKind::SourceReadError,
                      "shard '" + label_ + "': file ended at offset " +
                          std::to_string(offset + done) + " but " + std::to_string(bytes - done) +
                          " more bytes were expected (was it truncated or replaced during the "
                          "load?)",
                      label_, static_cast<int64_t>(offset + done));
    }
    done += static_cast<size_t>(n);
  }
}

}  // namespace blob2gpu
