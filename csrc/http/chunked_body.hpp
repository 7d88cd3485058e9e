// ChunkedDecoder: the chunked transfer coding (RFC 9112 section 7.1) of an error answer's or a
// listing's body, decoded incrementally, strictly and within caps, so a connection whose answer
// came chunked (Azurite and Blob Storage send them so) is read to its end and kept alive. Range
// bodies are never chunked (see response_head.hpp). Hostile input: pure code, fuzzed with the head
// reader.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace blob2gpu {

class ChunkedDecoder {
 public:
  enum class State { More, Done, Malformed };

  // max_body_bytes: the most decoded bytes accepted (more is Malformed).
  explicit ChunkedDecoder(uint64_t max_body_bytes) : max_body_(max_body_bytes) {}

  // Decodes data[0, n), appending decoded bytes to *out while it is shorter than `keep` (the
  // rest are counted, not kept). Returns More (feed the next bytes), Done (the body and its
  // trailers ended; *consumed says where: any bytes after it are not the body's) or Malformed
  // (problem() says what). *consumed: how many of the n bytes were used.
  State feed(const char* data, size_t n, size_t* consumed, std::string* out, size_t keep);

  const std::string& problem() const { return problem_; }
  uint64_t body_bytes() const { return body_; }

 private:
  enum class Step { Size, Extension, SizeEnd, Data, DataCr, DataLf, Trailer, TrailerEnd, Done };
  State fail(const char* problem);

  uint64_t max_body_;
  uint64_t body_ = 0;
  uint64_t chunk_left_ = 0;
  Step step_ = Step::Size;
  int size_digits_ = 0;
  size_t extension_bytes_ = 0;
  size_t trailer_bytes_ = 0;
  size_t line_bytes_ = 0;  // bytes of the current trailer line
  std::string problem_;
};

}  // namespace blob2gpu
