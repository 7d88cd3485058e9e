#include "checksum.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#if defined(__x86_64__)
#define BLOB2GPU_X86_64 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#if defined(__aarch64__)
#define BLOB2GPU_AARCH64 1
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)  // <asm/hwcap.h>; spelled out for old kernel headers
#endif
#endif
// Compiled for the CRC extension function by function, so the rest of the library still runs on
// a plain ARMv8.0 core; the baseline flags already allow it where __ARM_FEATURE_CRC32 is set.
#if defined(__ARM_FEATURE_CRC32)
#define BLOB2GPU_TARGET_ARM_CRC
#elif defined(__clang__)
#define BLOB2GPU_TARGET_ARM_CRC __attribute__((target("crc")))
#else
#define BLOB2GPU_TARGET_ARM_CRC __attribute__((target("+crc")))
#endif
#endif

namespace blob2gpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Byte order helpers: the formats fix the byte order, whatever the host's.

inline uint64_t load_le64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

inline uint32_t load_be32(const uint8_t* p) {
  return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) |
         (static_cast<uint32_t>(p[2]) << 8) | static_cast<uint32_t>(p[3]);
}

inline void store_be32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}

// ---------------------------------------------------------------------------------------------
// CRC32C. Internally the functions carry the raw register (the value before the final xor), in
// the reflected representation where bit 31 holds the coefficient of x^0.

constexpr uint32_t kCrc32cPoly = 0x82F63B78u;  // 0x1EDC6F41 bit-reversed

// a(x) * b(x) mod P(x). Bitwise, used only to build tables and to combine.
constexpr uint32_t multiply_mod_p(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kCrc32cPoly : b >> 1;  // b *= x
  }
  return product;
}

struct Crc32cTables {
  // slice[k][i]: the raw CRC of byte i followed by k zero bytes, from a zero register.
  uint32_t slice[8][256] = {};
  // x_8_pow2[k] = x^(8 * 2^k) mod P: shifting a CRC over 2^k zero bytes is a multiplication by it.
  uint32_t x_8_pow2[64] = {};
};

constexpr Crc32cTables make_crc32c_tables() {
  Crc32cTables t;
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t crc = i;
    for (int bit = 0; bit < 8; ++bit) crc = (crc & 1) ? (crc >> 1) ^ kCrc32cPoly : crc >> 1;
    t.slice[0][i] = crc;
  }
  for (int k = 1; k < 8; ++k) {
    for (uint32_t i = 0; i < 256; ++i) {
      const uint32_t prev = t.slice[k - 1][i];
      t.slice[k][i] = (prev >> 8) ^ t.slice[0][prev & 0xFF];
    }
  }
  uint32_t power = 1u << 23;  // x^8
  for (int k = 0; k < 64; ++k) {
    t.x_8_pow2[k] = power;
    power = multiply_mod_p(power, power);
  }
  return t;
}

constexpr Crc32cTables kCrc32c = make_crc32c_tables();

// x^(8 * n) mod P: the factor that moves a CRC past n zero bytes.
constexpr uint32_t x_pow_8n(uint64_t n) {
  uint32_t result = 1u << 31;  // x^0
  for (int k = 0; n != 0; ++k, n >>= 1) {
    if (n & 1) result = multiply_mod_p(kCrc32c.x_8_pow2[k], result);
  }
  return result;
}

// Multiplication by one fixed factor, byte by byte: four lookups instead of 32 shift-and-xors.
// The hardware paths use it to join three streams computed side by side.
struct Crc32cShift {
  uint32_t table[4][256] = {};
};

constexpr Crc32cShift make_shift(uint64_t bytes) {
  Crc32cShift s;
  const uint32_t factor = x_pow_8n(bytes);
  for (int k = 0; k < 4; ++k) {
    for (uint32_t i = 0; i < 256; ++i) s.table[k][i] = multiply_mod_p(factor, i << (8 * k));
  }
  return s;
}

inline uint32_t shift_crc(const Crc32cShift& s, uint32_t crc) {
  return s.table[0][crc & 0xFF] ^ s.table[1][(crc >> 8) & 0xFF] ^ s.table[2][(crc >> 16) & 0xFF] ^
         s.table[3][crc >> 24];
}

// The CRC instructions have a latency of about three cycles and a throughput of one per cycle, so
// a single dependency chain runs at a third of the peak. Three independent streams over adjacent
// blocks fill the pipeline; their CRCs are joined as crc(A B C) = shift(shift(a) ^ b) ^ c, where
// shift() moves a CRC past one block of zeros. Long blocks first, then short ones for the tail.
constexpr size_t kLongBlock = 8192;
constexpr size_t kShortBlock = 256;
constexpr Crc32cShift kShiftLong = make_shift(kLongBlock);
constexpr Crc32cShift kShiftShort = make_shift(kShortBlock);

uint32_t crc32c_raw_portable(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& t = kCrc32c.slice;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
    --n;
  }
  // Slicing-by-8: the first of the eight bytes is followed by seven more, hence t[7].
  while (n >= 8) {
    const uint64_t w = load_le64(p) ^ crc;
    crc = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^ t[4][(w >> 24) & 0xFF] ^
          t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^ t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  return crc;
}

#if defined(BLOB2GPU_X86_64)
// "crc32" as well as "sse4.2": newer clang (zig's, which builds the wheels) lists the CRC32
// instructions as a feature of their own.
#define BLOB2GPU_TARGET_SSE42 "sse4.2,crc32"

template <size_t kBlock>
__attribute__((target(BLOB2GPU_TARGET_SSE42), always_inline)) inline uint64_t sse42_three_way(
    uint64_t crc, const uint8_t** p, size_t* n, const Crc32cShift& shift) {
  while (*n >= 3 * kBlock) {
    const uint8_t* a = *p;
    const uint8_t* const end = a + kBlock;
    uint64_t c0 = crc;
    uint64_t c1 = 0;
    uint64_t c2 = 0;
    do {
      c0 = _mm_crc32_u64(c0, load_le64(a));
      c1 = _mm_crc32_u64(c1, load_le64(a + kBlock));
      c2 = _mm_crc32_u64(c2, load_le64(a + 2 * kBlock));
      a += 8;
    } while (a < end);
    crc = shift_crc(shift, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    crc = shift_crc(shift, static_cast<uint32_t>(crc)) ^ static_cast<uint32_t>(c2);
    *p += 3 * kBlock;
    *n -= 3 * kBlock;
  }
  return crc;
}

__attribute__((target(BLOB2GPU_TARGET_SSE42))) uint32_t crc32c_raw_sse42(uint32_t crc,
                                                                         const uint8_t* p,
                                                                         size_t n) {
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    crc = _mm_crc32_u8(crc, *p++);
    --n;
  }
  uint64_t c = crc;
  c = sse42_three_way<kLongBlock>(c, &p, &n, kShiftLong);
  c = sse42_three_way<kShortBlock>(c, &p, &n, kShiftShort);
  while (n >= 8) {
    c = _mm_crc32_u64(c, load_le64(p));
    p += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(c);
  while (n-- > 0) crc = _mm_crc32_u8(crc, *p++);
  return crc;
}

// Carry-less multiplication folding (AVX-512 VPCLMULQDQ): 256 bytes per step in four 512-bit
// accumulators, no dependency on the CRC instruction's latency. A 128-bit block X of the message
// contributes X(x) * x^(bits after it); moving it D bits forward is a multiplication by x^D mod P,
// done on its two 64-bit halves with two precomputed 32-bit factors. In the reflected layout the
// low qword of a 128-bit load holds the high-degree half, and a carry-less product gains one
// factor of x, so the factors are x^(D + 63) (low qword) and x^(D - 1) (high qword). What is left
// at the end, a 128-bit remainder and under 16 bytes, goes through the CRC instruction.
constexpr uint32_t x_pow_bits(uint64_t n) {
  uint32_t result = 1u << 31;  // x^0
  uint32_t base = 1u << 30;    // x^1
  for (; n != 0; n >>= 1) {
    if (n & 1) result = multiply_mod_p(result, base);
    base = multiply_mod_p(base, base);
  }
  return result;
}

struct FoldFactors {
  uint64_t low;   // multiplies the low qword (the block's high-degree half)
  uint64_t high;  // multiplies the high qword
};

constexpr FoldFactors fold_factors(uint64_t bits) {
  return {static_cast<uint64_t>(x_pow_bits(bits + 63)) << 32,
          static_cast<uint64_t>(x_pow_bits(bits - 1)) << 32};
}

constexpr FoldFactors kFold128 = fold_factors(128);
constexpr FoldFactors kFold256 = fold_factors(256);
constexpr FoldFactors kFold384 = fold_factors(384);
constexpr FoldFactors kFold512 = fold_factors(512);
constexpr FoldFactors kFold2048 = fold_factors(2048);
constexpr size_t kFoldMinBytes = 512;  // below this the three-way CRC instruction path is faster

// GCC 12's AVX-512 headers seed some results with a self-initialised "undefined" vector, which
// -Wmaybe-uninitialized reports at every use; the values are fully written by the instructions.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define BLOB2GPU_TARGET_VPCLMUL \
  __attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul," BLOB2GPU_TARGET_SSE42)))

BLOB2GPU_TARGET_VPCLMUL inline __m128i fold_128(__m128i x, FoldFactors k, __m128i next) {
  const __m128i factors =
      _mm_set_epi64x(static_cast<long long>(k.high), static_cast<long long>(k.low));
  return _mm_ternarylogic_epi64(_mm_clmulepi64_si128(x, factors, 0x00),
                                _mm_clmulepi64_si128(x, factors, 0x11), next, 0x96);
}

BLOB2GPU_TARGET_VPCLMUL inline __m512i fold_512(__m512i x, __m512i factors, __m512i next) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, factors, 0x00),
                                   _mm512_clmulepi64_epi128(x, factors, 0x11), next, 0x96);
}

BLOB2GPU_TARGET_VPCLMUL __m512i broadcast_factors(FoldFactors k) {
  return _mm512_broadcast_i32x4(
      _mm_set_epi64x(static_cast<long long>(k.high), static_cast<long long>(k.low)));
}

BLOB2GPU_TARGET_VPCLMUL uint32_t crc32c_raw_vpclmul(uint32_t crc, const uint8_t* p, size_t n) {
  if (n < kFoldMinBytes) return crc32c_raw_sse42(crc, p, n);
  // The register enters as an xor into the first four message bytes.
  __m512i z0 = _mm512_xor_si512(_mm512_loadu_si512(p),
                                _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc))));
  __m512i z1 = _mm512_loadu_si512(p + 64);
  __m512i z2 = _mm512_loadu_si512(p + 128);
  __m512i z3 = _mm512_loadu_si512(p + 192);
  p += 256;
  n -= 256;
  const __m512i k2048 = broadcast_factors(kFold2048);
  while (n >= 256) {
    z0 = fold_512(z0, k2048, _mm512_loadu_si512(p));
    z1 = fold_512(z1, k2048, _mm512_loadu_si512(p + 64));
    z2 = fold_512(z2, k2048, _mm512_loadu_si512(p + 128));
    z3 = fold_512(z3, k2048, _mm512_loadu_si512(p + 192));
    p += 256;
    n -= 256;
  }
  const __m512i k512 = broadcast_factors(kFold512);
  z1 = fold_512(z0, k512, z1);
  z2 = fold_512(z1, k512, z2);
  z3 = fold_512(z2, k512, z3);
  __m128i x = _mm512_extracti32x4_epi32(z3, 3);
  x = fold_128(_mm512_extracti32x4_epi32(z3, 2), kFold128, x);
  x = fold_128(_mm512_extracti32x4_epi32(z3, 1), kFold256, x);
  x = fold_128(_mm512_extracti32x4_epi32(z3, 0), kFold384, x);
  while (n >= 16) {
    x = fold_128(x, kFold128, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    p += 16;
    n -= 16;
  }
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(x)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(x, 1)));
  return crc32c_raw_sse42(static_cast<uint32_t>(c), p, n);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // BLOB2GPU_X86_64

#if defined(BLOB2GPU_AARCH64)
// The compilers' builtins rather than <arm_acle.h>, whose __crc32c* older clangs only declare when
// the whole file is built with +crc.
BLOB2GPU_TARGET_ARM_CRC __attribute__((always_inline)) inline uint32_t arm_crc32c_u8(uint32_t crc,
                                                                                     uint8_t v) {
#if defined(__clang__)
  return __builtin_arm_crc32cb(crc, v);
#else
  return __builtin_aarch64_crc32cb(crc, v);
#endif
}

BLOB2GPU_TARGET_ARM_CRC __attribute__((always_inline)) inline uint32_t arm_crc32c_u64(uint32_t crc,
                                                                                      uint64_t v) {
#if defined(__clang__)
  return __builtin_arm_crc32cd(crc, v);
#else
  return __builtin_aarch64_crc32cx(crc, v);
#endif
}

template <size_t kBlock>
BLOB2GPU_TARGET_ARM_CRC inline uint32_t armv8_three_way(uint32_t crc, const uint8_t** p, size_t* n,
                                                        const Crc32cShift& shift) {
  while (*n >= 3 * kBlock) {
    const uint8_t* a = *p;
    const uint8_t* const end = a + kBlock;
    uint32_t c0 = crc;
    uint32_t c1 = 0;
    uint32_t c2 = 0;
    do {
      c0 = arm_crc32c_u64(c0, load_le64(a));
      c1 = arm_crc32c_u64(c1, load_le64(a + kBlock));
      c2 = arm_crc32c_u64(c2, load_le64(a + 2 * kBlock));
      a += 8;
    } while (a < end);
    crc = shift_crc(shift, c0) ^ c1;
    crc = shift_crc(shift, crc) ^ c2;
    *p += 3 * kBlock;
    *n -= 3 * kBlock;
  }
  return crc;
}

BLOB2GPU_TARGET_ARM_CRC uint32_t crc32c_raw_armv8(uint32_t crc, const uint8_t* p, size_t n) {
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    crc = arm_crc32c_u8(crc, *p++);
    --n;
  }
  crc = armv8_three_way<kLongBlock>(crc, &p, &n, kShiftLong);
  crc = armv8_three_way<kShortBlock>(crc, &p, &n, kShiftShort);
  while (n >= 8) {
    crc = arm_crc32c_u64(crc, load_le64(p));
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = arm_crc32c_u8(crc, *p++);
  return crc;
}

bool armv8_crc_supported() {
#if defined(__ARM_FEATURE_CRC32) || defined(__APPLE__)
  return true;
#elif defined(__linux__)
  return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
#else
  return false;
#endif
}
#endif  // BLOB2GPU_AARCH64

using Crc32cFn = uint32_t (*)(uint32_t crc, const uint8_t* p, size_t n);

Crc32cFn hardware_crc32c() {
#if defined(BLOB2GPU_X86_64)
  __builtin_cpu_init();  // harmless if done; needed if the first call runs in a constructor
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("sse4.2")) {
    return crc32c_raw_vpclmul;
  }
  if (__builtin_cpu_supports("sse4.2")) return crc32c_raw_sse42;
#elif defined(BLOB2GPU_AARCH64)
  if (armv8_crc_supported()) return crc32c_raw_armv8;
#endif
  return nullptr;
}

Crc32cFn best_crc32c() {
  static const Crc32cFn fn = [] {
    const Crc32cFn hw = hardware_crc32c();
    return hw ? hw : crc32c_raw_portable;
  }();
  return fn;
}

// ---------------------------------------------------------------------------------------------
// SHA-256 (FIPS 180-4).

constexpr uint32_t kSha256Init[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

// Round constants, 4.2.2: the first 32 bits of the fractional parts of the cube roots of the
// first 64 primes. Aligned so the SHA-NI path can load them four at a time.
alignas(16) constexpr uint32_t kSha256K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

inline uint32_t rotr(uint32_t x, int n) {
  return (x >> n) | (x << (32 - n));
}

void sha256_compress_portable(uint32_t* state, const uint8_t* p, size_t n_blocks) {
  for (; n_blocks > 0; --n_blocks, p += Sha256::kBlockBytes) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) w[i] = load_be32(p + 4 * i);
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 =
          h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kSha256K[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
  }
}

#if defined(BLOB2GPU_X86_64)
#define BLOB2GPU_TARGET_SHA_NI __attribute__((target("sha,sse4.1,ssse3")))

// Four rounds, G = 0..15. sha256rnds2 keeps the state as (A,B,E,F) and (C,D,G,H) and runs two
// rounds on the low two words of W+K. msg[G % 4] holds W[4G..4G+3]; from G = 4 on, it is
// computed in place from the four previous groups: W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) +
// W[t-16].
template <int G>
BLOB2GPU_TARGET_SHA_NI __attribute__((always_inline)) inline void sha_ni_rounds(
    __m128i* msg, __m128i* abef, __m128i* cdgh, const uint8_t* block, __m128i byte_swap) {
  if constexpr (G < 4) {
    msg[G] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16 * G)),
                              byte_swap);
  } else {
    const __m128i prev = msg[(G + 3) % 4];                              // W[t-4 .. t-1]
    __m128i next = _mm_sha256msg1_epu32(msg[G % 4], msg[(G + 1) % 4]);  // W[t-16] + s0(W[t-15])
    next = _mm_add_epi32(next, _mm_alignr_epi8(prev, msg[(G + 2) % 4], 4));  // + W[t-7]
    msg[G % 4] = _mm_sha256msg2_epu32(next, prev);                           // + s1(W[t-2])
  }
  __m128i wk =
      _mm_add_epi32(msg[G % 4], _mm_load_si128(reinterpret_cast<const __m128i*>(kSha256K + 4 * G)));
  *cdgh = _mm_sha256rnds2_epu32(*cdgh, *abef, wk);
  wk = _mm_shuffle_epi32(wk, 0x0E);  // the upper two words
  *abef = _mm_sha256rnds2_epu32(*abef, *cdgh, wk);
}

template <int... G>
BLOB2GPU_TARGET_SHA_NI __attribute__((always_inline)) inline void sha_ni_block(
    __m128i* abef, __m128i* cdgh, const uint8_t* block, __m128i byte_swap,
    std::integer_sequence<int, G...>) {
  __m128i msg[4];
  (sha_ni_rounds<G>(msg, abef, cdgh, block, byte_swap), ...);
}

BLOB2GPU_TARGET_SHA_NI void sha256_compress_sha_ni(uint32_t* state, const uint8_t* p,
                                                   size_t n_blocks) {
  // Big-endian message words: reverse the bytes of each 32-bit lane.
  const __m128i byte_swap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
  // state[0..7] = A..H  ->  abef = (lanes 3..0) A B E F, cdgh = C D G H.
  __m128i dcba = _mm_loadu_si128(reinterpret_cast<const __m128i*>(state));
  __m128i hgfe = _mm_loadu_si128(reinterpret_cast<const __m128i*>(state + 4));
  dcba = _mm_shuffle_epi32(dcba, 0xB1);              // C D A B
  hgfe = _mm_shuffle_epi32(hgfe, 0x1B);              // E F G H
  __m128i abef = _mm_alignr_epi8(dcba, hgfe, 8);     // A B E F
  __m128i cdgh = _mm_blend_epi16(hgfe, dcba, 0xF0);  // C D G H
  for (; n_blocks > 0; --n_blocks, p += Sha256::kBlockBytes) {
    const __m128i abef_in = abef;
    const __m128i cdgh_in = cdgh;
    sha_ni_block(&abef, &cdgh, p, byte_swap, std::make_integer_sequence<int, 16>{});
    abef = _mm_add_epi32(abef, abef_in);
    cdgh = _mm_add_epi32(cdgh, cdgh_in);
  }
  const __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
  const __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state), _mm_blend_epi16(feba, dchg, 0xF0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), _mm_alignr_epi8(dchg, feba, 8));
}

bool x86_sha_ni_supported() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const bool ssse3 = (ecx & (1u << 9)) != 0;
  const bool sse41 = (ecx & (1u << 19)) != 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool sha = (ebx & (1u << 29)) != 0;
  return ssse3 && sse41 && sha;
}
#endif  // BLOB2GPU_X86_64

using Sha256CompressFn = void (*)(uint32_t* state, const uint8_t* blocks, size_t n_blocks);

Sha256CompressFn hardware_sha256() {
  static const Sha256CompressFn fn = []() -> Sha256CompressFn {
#if defined(BLOB2GPU_X86_64)
    if (x86_sha_ni_supported()) return sha256_compress_sha_ni;
#endif
    return nullptr;
  }();
  return fn;
}

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  return ~best_crc32c()(~crc, static_cast<const uint8_t*>(data), n);
}

uint32_t crc32c_portable(const void* data, size_t n, uint32_t crc) {
  return ~crc32c_raw_portable(~crc, static_cast<const uint8_t*>(data), n);
}

// crc(A B) = crc(A) x^(8|B|) + crc(B): the initial and final inversions cancel out.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  return multiply_mod_p(x_pow_8n(len_b), crc_a) ^ crc_b;
}

bool crc32c_hardware_available() {
  return best_crc32c() != crc32c_raw_portable;
}

bool sha256_hardware_available() {
  return hardware_sha256() != nullptr;
}

Sha256::Sha256(bool allow_hardware) {
  const CompressFn hw = allow_hardware ? hardware_sha256() : nullptr;
  compress_ = hw ? hw : sha256_compress_portable;
  reset();
}

void Sha256::reset() {
  std::memcpy(state_.data(), kSha256Init, sizeof(kSha256Init));
  pending_bytes_ = 0;
  total_bytes_ = 0;
}

bool Sha256::uses_hardware() const {
  return compress_ != sha256_compress_portable;
}

void Sha256::update(const void* data, size_t n) {
  if (n == 0) return;
  auto p = static_cast<const uint8_t*>(data);
  total_bytes_ += n;
  if (pending_bytes_ > 0) {
    const size_t take = std::min(n, kBlockBytes - pending_bytes_);
    std::memcpy(pending_.data() + pending_bytes_, p, take);
    pending_bytes_ += take;
    p += take;
    n -= take;
    if (pending_bytes_ < kBlockBytes) return;
    compress_(state_.data(), pending_.data(), 1);
    pending_bytes_ = 0;
  }
  const size_t whole = n / kBlockBytes;
  if (whole > 0) {
    compress_(state_.data(), p, whole);
    p += whole * kBlockBytes;
    n -= whole * kBlockBytes;
  }
  if (n > 0) {
    std::memcpy(pending_.data(), p, n);
    pending_bytes_ = n;
  }
}

Sha256::Digest Sha256::finish() const {
  // 5.1.1: a 1 bit, zeros up to 56 mod 64 bytes, then the message length in bits, big-endian.
  uint8_t tail[2 * kBlockBytes] = {};
  std::memcpy(tail, pending_.data(), pending_bytes_);
  tail[pending_bytes_] = 0x80;
  const size_t tail_bytes = pending_bytes_ + 1 + 8 <= kBlockBytes ? kBlockBytes : 2 * kBlockBytes;
  const uint64_t bits = total_bytes_ * 8;
  for (int i = 0; i < 8; ++i) tail[tail_bytes - 1 - i] = static_cast<uint8_t>(bits >> (8 * i));
  std::array<uint32_t, 8> state = state_;
  compress_(state.data(), tail, tail_bytes / kBlockBytes);
  Digest digest;
  for (int i = 0; i < 8; ++i) store_be32(digest.data() + 4 * i, state[i]);
  return digest;
}

std::string Sha256::hex() const {
  static const char kHex[] = "0123456789abcdef";
  const Digest digest = finish();
  std::string out(2 * kDigestBytes, '0');
  for (size_t i = 0; i < kDigestBytes; ++i) {
    out[2 * i] = kHex[digest[i] >> 4];
    out[2 * i + 1] = kHex[digest[i] & 0xF];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// MD5 (RFC 1321)

namespace {

struct Md5Tables {
  uint32_t k[64];
  Md5Tables() {
    // k[i] = floor(|sin(i + 1)| * 2^32), as RFC 1321 section 3.4 defines the table.
    for (int i = 0; i < 64; ++i) {
      k[i] = static_cast<uint32_t>(std::floor(std::fabs(std::sin(i + 1.0)) * 4294967296.0));
    }
  }
};

const Md5Tables& md5_tables() {
  static const Md5Tables tables;
  return tables;
}

inline uint32_t rotl32(uint32_t x, int n) {
  return (x << n) | (x >> (32 - n));
}

// One step of a round: a = b + rotl(a + f(b, c, d) + m[g] + k[i], s), fully unrolled below so
// the compiler keeps the 64 steps' constants and shifts in the instruction stream.
#define BLOB2GPU_MD5_STEP(f, a, b, c, d, g, i, s) \
  a += f(b, c, d) + m[g] + k[i];                  \
  a = b + rotl32(a, s)
#define BLOB2GPU_MD5_F(b, c, d) (d ^ (b & (c ^ d)))
#define BLOB2GPU_MD5_G(b, c, d) (c ^ (d & (b ^ c)))
#define BLOB2GPU_MD5_H(b, c, d) (b ^ c ^ d)
#define BLOB2GPU_MD5_I(b, c, d) (c ^ (b | ~d))
#define BLOB2GPU_MD5_ROUND4(f, i, g0, g1, g2, g3, s0, s1, s2, s3) \
  BLOB2GPU_MD5_STEP(f, a, b, c, d, g0, i, s0);                    \
  BLOB2GPU_MD5_STEP(f, d, a, b, c, g1, i + 1, s1);                \
  BLOB2GPU_MD5_STEP(f, c, d, a, b, g2, i + 2, s2);                \
  BLOB2GPU_MD5_STEP(f, b, c, d, a, g3, i + 3, s3)

void md5_compress(uint32_t* state, const uint8_t* blocks, size_t n_blocks) {
  const uint32_t* k = md5_tables().k;
  for (; n_blocks > 0; --n_blocks, blocks += 64) {
    uint32_t m[16];
    for (int i = 0; i < 16; ++i) {
      const uint8_t* p = blocks + 4 * i;
      m[i] = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_F, 0, 0, 1, 2, 3, 7, 12, 17, 22);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_F, 4, 4, 5, 6, 7, 7, 12, 17, 22);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_F, 8, 8, 9, 10, 11, 7, 12, 17, 22);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_F, 12, 12, 13, 14, 15, 7, 12, 17, 22);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_G, 16, 1, 6, 11, 0, 5, 9, 14, 20);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_G, 20, 5, 10, 15, 4, 5, 9, 14, 20);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_G, 24, 9, 14, 3, 8, 5, 9, 14, 20);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_G, 28, 13, 2, 7, 12, 5, 9, 14, 20);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_H, 32, 5, 8, 11, 14, 4, 11, 16, 23);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_H, 36, 1, 4, 7, 10, 4, 11, 16, 23);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_H, 40, 13, 0, 3, 6, 4, 11, 16, 23);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_H, 44, 9, 12, 15, 2, 4, 11, 16, 23);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_I, 48, 0, 7, 14, 5, 6, 10, 15, 21);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_I, 52, 12, 3, 10, 1, 6, 10, 15, 21);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_I, 56, 8, 15, 6, 13, 6, 10, 15, 21);
    BLOB2GPU_MD5_ROUND4(BLOB2GPU_MD5_I, 60, 4, 11, 2, 9, 6, 10, 15, 21);
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
  }
}
#undef BLOB2GPU_MD5_ROUND4
#undef BLOB2GPU_MD5_STEP
#undef BLOB2GPU_MD5_F
#undef BLOB2GPU_MD5_G
#undef BLOB2GPU_MD5_H
#undef BLOB2GPU_MD5_I

}  // namespace

Md5::Md5() : state_{0x67452301u, 0xefcdab89u, 0x98badcfeu, 0x10325476u} {}

void Md5::update(const void* data, size_t n) {
  if (n == 0) return;
  auto p = static_cast<const uint8_t*>(data);
  total_bytes_ += n;
  if (pending_bytes_ > 0) {
    const size_t take = std::min(n, size_t{64} - pending_bytes_);
    std::memcpy(pending_.data() + pending_bytes_, p, take);
    pending_bytes_ += take;
    p += take;
    n -= take;
    if (pending_bytes_ < 64) return;
    md5_compress(state_.data(), pending_.data(), 1);
    pending_bytes_ = 0;
  }
  const size_t whole = n / 64;
  if (whole > 0) {
    md5_compress(state_.data(), p, whole);
    p += whole * 64;
    n -= whole * 64;
  }
  if (n > 0) {
    std::memcpy(pending_.data(), p, n);
    pending_bytes_ = n;
  }
}

Md5::Digest Md5::finish() const {
  // A 1 bit, zeros up to 56 mod 64 bytes, then the length in bits, little-endian.
  uint8_t tail[128] = {};
  std::memcpy(tail, pending_.data(), pending_bytes_);
  tail[pending_bytes_] = 0x80;
  const size_t tail_bytes = pending_bytes_ + 1 + 8 <= 64 ? 64 : 128;
  const uint64_t bits = total_bytes_ * 8;
  for (int i = 0; i < 8; ++i) tail[tail_bytes - 8 + i] = static_cast<uint8_t>(bits >> (8 * i));
  std::array<uint32_t, 4> state = state_;
  md5_compress(state.data(), tail, tail_bytes / 64);
  Digest digest;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) digest[4 * i + j] = static_cast<uint8_t>(state[i] >> (8 * j));
  }
  return digest;
}

}  // namespace blob2gpu
