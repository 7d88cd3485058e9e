// The control plane's file reads: an index, a manifest, /proc/meminfo and the cgroup files a load
// sizes itself by, the shards' kinds and sizes. Each system call Python makes gives the GIL up and
// must take it back, which in a process where another thread runs Python waits up to a switch
// interval; read here, a batch of them costs one return.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace blob2gpu {

struct SmallFile {
  std::string data;  // what was read: nothing unless regular and size <= limit
  int error = 0;     // errno of open, fstat or read; 0 when those succeeded
  bool regular = false;
  uint64_t size = 0;        // st_size at open
  bool over_limit = false;  // st_size, or what was read (a file growing meanwhile), over limit
};

// Reads each path (symlinks followed; O_NONBLOCK, so a FIFO does not block the open) when it is a
// regular file of at most `limit` bytes: at most limit + 1 bytes are read, so a file that grows
// meanwhile is seen to be over the limit. A path with a NUL in it is EINVAL. Blocks on the disk;
// call it without the GIL. follow_symlinks false: a symlink is not opened (ELOOP), as a file others
// on the node may write is read (the throttle state, the cache's records).
// Relative paths are taken from `dir_fd` (openat; AT_FDCWD: the working directory).
std::vector<SmallFile> read_small_files(const std::vector<std::string>& paths, uint64_t limit,
                                        bool follow_symlinks, int dir_fd);

struct PathKind {
  int error = 0;  // errno of stat (ENOENT for a missing path); 0 when it succeeded
  bool regular = false;
  bool directory = false;
  uint64_t size = 0;
};

struct OpenedFile {
  int fd = -1;    // the descriptor kept open (the caller closes it); -1 when not kept
  int error = 0;  // errno of open or fstat; 0 when they succeeded
  bool regular = false;
  uint64_t size = 0;  // st_size
  uint32_t uid = 0;   // st_uid
  uint32_t mode = 0;  // st_mode
};

// Opens each name read-only from `dir_fd` (openat; never through a symlink: ELOOP; O_NONBLOCK, so a
// FIFO does not block the open) and keeps it open only when it is a regular file of sizes[i] bytes
// (sizes[i] < 0: of any size); else the descriptor is closed and the fields say why. When a file is
// kept and touch[i] is not empty, that name (from dir_fd, a symlink not followed) has its
// modification time set to now, failures ignored: the LRU touch of a cache entry's record. A name
// with a NUL in it is EINVAL. Blocks on the disk; call it without the GIL.
std::vector<OpenedFile> open_regular_files(const std::vector<std::string>& names,
                                           const std::vector<int64_t>& sizes,
                                           const std::vector<std::string>& touch, int dir_fd);

// stat(2) of each path, or lstat(2) when not following symlinks (a symlink is then neither regular
// nor a directory). A path with a NUL in it is EINVAL. Blocks on the disk; call it without the GIL.
std::vector<PathKind> stat_paths(const std::vector<std::string>& paths, bool follow_symlinks);

}  // namespace blob2gpu
