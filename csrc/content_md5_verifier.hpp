// ContentMd5Verifier: checks a blob against its Content-MD5 property (verify='auto' on a
// checkpoint without a manifest). MD5 runs over the bytes in file order while ranges land in any
// order: a range that arrives in turn is hashed at once, with any early ranges it unblocks; an
// early one waits, in place when its bytes stay put until the shard is finished (the cpu arena),
// else as a copy (a staging slot is reused as soon as its device copy is done). The last range
// to land completes the digest, before the shard's tensors are handed out. The hash runs outside
// the lock: a thread with a later range parks it and returns instead of waiting behind it; the
// thread with the very next range waits for the hash in progress (its bytes are hashed where
// they are, without a copy).
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "checksum.hpp"

namespace blob2gpu {

// How many shards of a load are being hashed at once, and the most there were: a load's
// Content-MD5 runs on as many threads as it has shards in flight, not one.
struct Md5Gauge {
  std::atomic<int> now{0};
  std::atomic<int> peak{0};
};

class ContentMd5Verifier {
 public:
  // gauge: the load's (may be null); it outlives the verifier.
  ContentMd5Verifier(std::string shard, uint64_t file_size, Md5::Digest expected,
                     Md5Gauge* gauge = nullptr);

  // File bytes [file_offset, file_offset + n) at `data`; `stays`: they remain valid at `data`
  // until the shard is finished. Returns the mismatch message once the last byte has been hashed
  // and the digest differs; nullopt otherwise. Thread-safe.
  std::optional<std::string> add(uint64_t file_offset, const uint8_t* data, size_t n, bool stays);
  // Bytes that landed ahead of the hash and were copied to wait for it.
  uint64_t parked_bytes() const { return parked_bytes_.load(); }

 private:
  struct Early {
    const uint8_t* data;
    size_t n;
    std::unique_ptr<uint8_t[]> copy;
  };
  std::string shard_;
  uint64_t file_size_;
  Md5::Digest expected_;
  std::mutex mutex_;
  std::condition_variable hashed_;  // a thread finished hashing
  Md5 md5_;                         // used by the one thread that is hashing
  uint64_t next_ = 0;               // bytes hashed, or being hashed, so far
  bool hashing_ = false;            // a thread is hashing (md5_ is its own)
  bool finished_ = false;           // every byte hashed and the digest compared
  std::map<uint64_t, Early> early_;
  Md5Gauge* gauge_;
  std::atomic<uint64_t> parked_bytes_{0};
};

}  // namespace blob2gpu
