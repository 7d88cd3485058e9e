#include "content_md5_verifier.hpp"

#include <cstring>

#include "errors.hpp"

namespace blob2gpu {

namespace {

std::string base64(const uint8_t* data, size_t n) {
  static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = uint32_t(data[i]) << 16;
    if (i + 1 < n) v |= uint32_t(data[i + 1]) << 8;
    if (i + 2 < n) v |= data[i + 2];
    out += alphabet[(v >> 18) & 63];
    out += alphabet[(v >> 12) & 63];
    out += i + 1 < n ? alphabet[(v >> 6) & 63] : '=';
    out += i + 2 < n ? alphabet[v & 63] : '=';
  }
  return out;
}

}  // namespace

ContentMd5Verifier::ContentMd5Verifier(std::string shard, uint64_t file_size, Md5::Digest expected,
                                       Md5Gauge* gauge)
    : shard_(std::move(shard)), file_size_(file_size), expected_(expected), gauge_(gauge) {}

std::optional<std::string> ContentMd5Verifier::add(uint64_t file_offset, const uint8_t* data,
                                                   size_t n, bool stays) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (n == 0 || finished_) return std::nullopt;
  hashed_.wait(lock, [&] { return !hashing_ || file_offset != next_; });
  if (file_offset < next_ || early_.count(file_offset) != 0) {
    throw CoreError(ErrorKind::InvalidArgument, "shard '" + shard_ + "': bytes at " +
                                                    std::to_string(file_offset) + " landed twice");
  }
  if (file_offset > next_) {
    Early early{data, n, nullptr};
    if (!stays) {
      early.copy.reset(new uint8_t[n]);
      std::memcpy(early.copy.get(), data, n);
      early.data = early.copy.get();
      parked_bytes_ += n;
    }
    early_.emplace(file_offset, std::move(early));
    return std::nullopt;
  }
  // This range is next: hash it, then every parked range it unblocks, with the lock released.
  hashing_ = true;
  std::unique_ptr<uint8_t[]> copy;
  for (;;) {
    next_ += n;
    lock.unlock();
    if (gauge_) {
      const int now = ++gauge_->now;
      int peak = gauge_->peak.load();
      while (now > peak && !gauge_->peak.compare_exchange_weak(peak, now)) {
      }
    }
    md5_.update(data, n);
    if (gauge_) --gauge_->now;
    copy.reset();
    lock.lock();
    auto it = early_.find(next_);
    if (it == early_.end()) break;
    data = it->second.data;
    n = it->second.n;
    copy = std::move(it->second.copy);
    early_.erase(it);
  }
  hashing_ = false;
  hashed_.notify_all();
  if (next_ < file_size_) return std::nullopt;
  finished_ = true;
  const Md5::Digest actual = md5_.finish();
  if (actual == expected_) return std::nullopt;
  return "shard '" + shard_ + "': its bytes have MD5 " + base64(actual.data(), actual.size()) +
         " but the blob's Content-MD5 is " + base64(expected_.data(), expected_.size()) +
         " (corrupted in storage or on the wire); nothing from this load was kept";
}

}  // namespace blob2gpu
