// The checksums of the integrity manifest: CRC32C per chunk (verified as chunks land) and SHA-256
// per file. Both pick a hardware path at run time (SSE4.2 / ARMv8 CRC, SHA-NI) and fall back to
// portable code, so the library is built without -msse4.2 and runs on any CPU of its architecture.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace blob2gpu {

// CRC32C (Castagnoli, reflected polynomial 0x82F63B78, init and final xor ~0): the value Azure
// Storage and the `crc32c` PyPI package compute. `crc` is the CRC of the bytes before `data`, so
// crc32c(b, nb, crc32c(a, na)) == crc32c(a + b). Uses the fastest path the CPU has.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// The same value from the table-driven code (slicing-by-8), whatever the CPU.
uint32_t crc32c_portable(const void* data, size_t n, uint32_t crc = 0);

// The CRC32C of a + b from crc_a = crc32c(a), crc_b = crc32c(b) and len_b = |b|, in O(log len_b):
// chunks verified in parallel add up to the CRC of the whole file.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

// Whether crc32c() runs on CRC instructions (SSE4.2 on x86-64, the CRC extension on AArch64).
bool crc32c_hardware_available();

// Whether Sha256 objects built with allow_hardware run on the SHA extensions (SHA-NI on x86-64).
bool sha256_hardware_available();

// SHA-256 (FIPS 180-4), fed incrementally. finish() leaves the object as it was, so update() may
// go on after a digest is read (as with hashlib).
class Sha256 {
 public:
  static constexpr size_t kDigestBytes = 32;
  static constexpr size_t kBlockBytes = 64;
  using Digest = std::array<uint8_t, kDigestBytes>;

  // allow_hardware = false forces the portable code (to test it on machines with SHA-NI).
  explicit Sha256(bool allow_hardware = true);

  void update(const void* data, size_t n);
  Digest finish() const;
  std::string hex() const;  // finish() as 64 lowercase hex digits
  void reset();
  bool uses_hardware() const;

 private:
  // Compresses n_blocks consecutive 64-byte blocks into the eight state words.
  using CompressFn = void (*)(uint32_t* state, const uint8_t* blocks, size_t n_blocks);

  CompressFn compress_;
  std::array<uint32_t, 8> state_;
  std::array<uint8_t, kBlockBytes> pending_;  // bytes of the block not yet compressed
  size_t pending_bytes_ = 0;
  uint64_t total_bytes_ = 0;
};

// MD5 (RFC 1321), for Azure Blob's Content-MD5 property only: not a security check.
class Md5 {
 public:
  static constexpr size_t kDigestBytes = 16;
  using Digest = std::array<uint8_t, kDigestBytes>;
  Md5();
  void update(const void* data, size_t n);
  Digest finish() const;

 private:
  std::array<uint32_t, 4> state_;
  std::array<uint8_t, 64> pending_;
  size_t pending_bytes_ = 0;
  uint64_t total_bytes_ = 0;
};

}  // namespace blob2gpu
