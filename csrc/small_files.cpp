// read_small_files and stat_paths (small_files.hpp).
#include "small_files.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace blob2gpu {

namespace {
constexpr uint64_t kReadBytes = 4u << 20;  // per read(2)

// Owns one descriptor: closed on every way out, a throwing allocation included.
class OpenFile {
 public:
  explicit OpenFile(int fd) : fd_(fd) {}
  ~OpenFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  OpenFile(const OpenFile&) = delete;
  OpenFile& operator=(const OpenFile&) = delete;
  int fd() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

bool has_nul(const std::string& path) {
  return path.find('\0') != std::string::npos;
}

SmallFile read_one(const std::string& path, uint64_t limit, bool follow_symlinks, int dir_fd) {
  SmallFile file;
  if (has_nul(path)) {  // C would read a shorter name: another file
    file.error = EINVAL;
    return file;
  }
  const int flags = O_RDONLY | O_NONBLOCK | O_CLOEXEC | (follow_symlinks ? 0 : O_NOFOLLOW);
  int fd;
  do {
    fd = ::openat(dir_fd, path.c_str(), flags);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    file.error = errno;
    return file;
  }
  OpenFile open_file(fd);
  struct stat info{};
  if (::fstat(fd, &info) != 0) {
    file.error = errno;
    return file;
  }
  file.regular = S_ISREG(info.st_mode);
  file.size = static_cast<uint64_t>(info.st_size);
  file.over_limit = file.regular && file.size > limit;
  if (!file.regular || file.over_limit) return file;
  // At most limit + 1 bytes: one past the limit says the file grew over it. /proc files say
  // size 0 and hold more: the buffer grows as they are read.
  const uint64_t cap = limit + 1;
  file.data.resize(static_cast<size_t>(std::min(cap, file.size + 1)));
  uint64_t total = 0;
  for (;;) {
    if (total == file.data.size()) {
      if (total >= cap) break;
      file.data.resize(static_cast<size_t>(std::min(cap, total + kReadBytes)));
    }
    const size_t want = static_cast<size_t>(std::min(kReadBytes, file.data.size() - total));
    const ssize_t got = ::read(fd, file.data.data() + total, want);
    if (got < 0) {
      if (errno == EINTR) continue;
      file.error = errno;
      break;
    }
    if (got == 0) break;
    total += static_cast<uint64_t>(got);
  }
  file.data.resize(static_cast<size_t>(total));
  file.over_limit = total > limit;
  if (file.error != 0 || file.over_limit) file.data.clear();
  return file;
}
}  // namespace

std::vector<SmallFile> read_small_files(const std::vector<std::string>& paths, uint64_t limit,
                                        bool follow_symlinks, int dir_fd) {
  std::vector<SmallFile> files;
  files.reserve(paths.size());
  for (const std::string& path : paths)
    files.push_back(read_one(path, limit, follow_symlinks, dir_fd));
  return files;
}

std::vector<OpenedFile> open_regular_files(const std::vector<std::string>& names,
                                           const std::vector<int64_t>& sizes,
                                           const std::vector<std::string>& touch, int dir_fd) {
  std::vector<OpenedFile> files(names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    OpenedFile& file = files[i];
    if (has_nul(names[i])) {
      file.error = EINVAL;
      continue;
    }
    int fd;
    do {
      fd = ::openat(dir_fd, names[i].c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
      file.error = errno;
      continue;
    }
    OpenFile open_file(fd);
    struct stat info{};
    if (::fstat(fd, &info) != 0) {
      file.error = errno;
      continue;
    }
    file.regular = S_ISREG(info.st_mode);
    file.size = static_cast<uint64_t>(info.st_size);
    file.uid = info.st_uid;
    file.mode = info.st_mode;
    const int64_t want = i < sizes.size() ? sizes[i] : -1;
    if (!file.regular || (want >= 0 && file.size != static_cast<uint64_t>(want))) continue;
    file.fd = open_file.release();
    if (i < touch.size() && !touch[i].empty() && !has_nul(touch[i]))
      ::utimensat(dir_fd, touch[i].c_str(), nullptr, AT_SYMLINK_NOFOLLOW);
  }
  return files;
}

std::vector<PathKind> stat_paths(const std::vector<std::string>& paths, bool follow_symlinks) {
  std::vector<PathKind> kinds;
  kinds.reserve(paths.size());
  for (const std::string& path : paths) {
    PathKind kind;
    struct stat info{};
    if (has_nul(path)) {
      kind.error = EINVAL;
    } else {
      int rc;
      do {
        rc = follow_symlinks ? ::stat(path.c_str(), &info) : ::lstat(path.c_str(), &info);
      } while (rc != 0 && errno == EINTR);
      if (rc != 0) {
        kind.error = errno;
      } else {
        kind.regular = S_ISREG(info.st_mode);
        kind.directory = S_ISDIR(info.st_mode);
        kind.size = static_cast<uint64_t>(info.st_size);
      }
    }
    kinds.push_back(kind);
  }
  return kinds;
}

}  // namespace blob2gpu
