#include "http/chunked_body.hpp"

#include <algorithm>

namespace blob2gpu {
namespace {

constexpr int kMaxSizeDigits = 15;           // 2^60 - 1: far past any cap, no overflow
constexpr size_t kMaxExtensionBytes = 1024;  // chunk extensions, per chunk (ignored)
constexpr size_t kMaxTrailerBytes = 8192;    // the trailer section, all lines

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

ChunkedDecoder::State ChunkedDecoder::fail(const char* problem) {
  problem_ = problem;
  return State::Malformed;
}

ChunkedDecoder::State ChunkedDecoder::feed(const char* data, size_t n, size_t* consumed,
                                           std::string* out, size_t keep) {
  size_t i = 0;
  *consumed = 0;
  if (!problem_.empty()) return State::Malformed;
  while (i < n && step_ != Step::Done) {
    char c = data[i];
    switch (step_) {
      case Step::Size: {
        int v = hex_value(c);
        if (v >= 0) {
          if (++size_digits_ > kMaxSizeDigits) return fail("a chunk size is too long");
          chunk_left_ = chunk_left_ * 16 + static_cast<uint64_t>(v);
          ++i;
          break;
        }
        if (size_digits_ == 0) return fail("a chunk does not start with its size in hex");
        if (c == ';' || c == ' ' || c == '\t') {
          step_ = Step::Extension;
        } else if (c == '\r') {
          step_ = Step::SizeEnd;
          ++i;
        } else {
          return fail("a chunk size is followed by something other than CRLF");
        }
        break;
      }
      case Step::Extension:
        if (c == '\r') {
          step_ = Step::SizeEnd;
        } else if (c == '\n' || ++extension_bytes_ > kMaxExtensionBytes) {
          return fail("a chunk extension is malformed or too long");
        }
        ++i;
        break;
      case Step::SizeEnd:
        if (c != '\n') return fail("a chunk size line does not end in CRLF");
        ++i;
        if (chunk_left_ > max_body_ - body_) return fail("the chunked body is over its cap");
        extension_bytes_ = 0;
        size_digits_ = 0;
        if (chunk_left_ == 0) {  // the last chunk: trailers follow
          step_ = Step::Trailer;
          line_bytes_ = 0;
        } else {
          step_ = Step::Data;
        }
        break;
      case Step::Data: {
        size_t take = n - i < chunk_left_ ? n - i : static_cast<size_t>(chunk_left_);
        if (out->size() < keep) out->append(data + i, std::min(take, keep - out->size()));
        body_ += take;
        chunk_left_ -= take;
        i += take;
        if (chunk_left_ == 0) step_ = Step::DataCr;
        break;
      }
      case Step::DataCr:
        if (c != '\r') return fail("a chunk's data is not followed by CRLF");
        step_ = Step::DataLf;
        ++i;
        break;
      case Step::DataLf:
        if (c != '\n') return fail("a chunk's data is not followed by CRLF");
        step_ = Step::Size;
        ++i;
        break;
      case Step::Trailer:
        if (++trailer_bytes_ > kMaxTrailerBytes) return fail("the chunked trailers are too long");
        if (c == '\r') {
          step_ = Step::TrailerEnd;
        } else if (c == '\n' || (line_bytes_ == 0 && (c == ' ' || c == '\t')) ||
                   (static_cast<unsigned char>(c) < 0x20 && c != '\t') || c == 0x7f) {
          return fail("a trailer line is malformed");
        } else {
          ++line_bytes_;
        }
        ++i;
        break;
      case Step::TrailerEnd:
        if (c != '\n') return fail("a trailer line does not end in CRLF");
        ++i;
        if (line_bytes_ == 0) {
          step_ = Step::Done;  // the empty line that ends the trailer section
        } else {
          line_bytes_ = 0;
          step_ = Step::Trailer;
        }
        break;
      case Step::Done:
        break;
    }
  }
  *consumed = i;
  return step_ == Step::Done ? State::Done : State::More;
}

}  // namespace blob2gpu
