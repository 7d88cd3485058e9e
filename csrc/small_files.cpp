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

SmallFile read_one(const std::string& path, uint64_t limit, bool follow_symlinks) {
  SmallFile file;
  if (path.find('\0') != std::string::npos) {  // C would read a shorter name: another file
    file.error = EINVAL;
    return file;
  }
  const int fd =
      ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | (follow_symlinks ? 0 : O_NOFOLLOW));
  if (fd < 0) {
    file.error = errno;
    return file;
  }
  struct stat info{};
  if (::fstat(fd, &info) != 0) {
    file.error = errno;
    ::close(fd);
    return file;
  }
  file.regular = S_ISREG(info.st_mode);
  file.size = static_cast<uint64_t>(info.st_size);
  file.over_limit = file.regular && file.size > limit;
  if (file.regular && !file.over_limit) {
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
  }
  ::close(fd);
  return file;
}
}  // namespace

std::vector<SmallFile> read_small_files(const std::vector<std::string>& paths, uint64_t limit,
                                        bool follow_symlinks) {
  std::vector<SmallFile> files;
  files.reserve(paths.size());
  for (const std::string& path : paths) files.push_back(read_one(path, limit, follow_symlinks));
  return files;
}

std::vector<PathKind> stat_paths(const std::vector<std::string>& paths, bool follow_symlinks) {
  std::vector<PathKind> kinds;
  kinds.reserve(paths.size());
  for (const std::string& path : paths) {
    PathKind kind;
    struct stat info{};
    if (path.find('\0') != std::string::npos) {
      kind.error = EINVAL;
    } else if ((follow_symlinks ? ::stat(path.c_str(), &info) : ::lstat(path.c_str(), &info)) !=
               0) {
      kind.error = errno;
    } else {
      kind.regular = S_ISREG(info.st_mode);
      kind.directory = S_ISDIR(info.st_mode);
      kind.size = static_cast<uint64_t>(info.st_size);
    }
    kinds.push_back(kind);
  }
  return kinds;
}

RangeRead read_file_range(const std::string& path, uint64_t offset, uint8_t* out, uint64_t size) {
  RangeRead read;
  if (path.find('\0') != std::string::npos) {
    read.error = EINVAL;
    return read;
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    read.error = errno;
    return read;
  }
  while (read.done < size) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(size - read.done, 1u << 30));
    const ssize_t got = ::pread(fd, out + read.done, want, static_cast<off_t>(offset + read.done));
    if (got < 0) {
      if (errno == EINTR) continue;
      read.error = errno;
      break;
    }
    if (got == 0) break;
    read.done += static_cast<uint64_t>(got);
  }
  ::close(fd);
  return read;
}

}  // namespace blob2gpu
