// The HTTP/1.1 response head reader of the native range reader: status line and headers, parsed
// strictly and within fixed caps, then the body's framing checked against the range that was asked
// for. A server's bytes are hostile input (a proxy, a middlebox, a compromised endpoint), so this
// is pure code over a buffer, with no I/O, and fuzzed (fuzz/http_response_fuzzer.cpp).
//
// Strict means: CRLF line ends only; "HTTP/1.0" or "HTTP/1.1" and a three-digit status; header
// names are tokens followed directly by ':'; no obsolete line folding; no control characters in
// values; Content-Length is digits, and every copy of it agrees; Transfer-Encoding together with
// Content-Length is refused (the request-smuggling ambiguity). A range body is never chunked: range
// bodies from Blob Storage always carry a Content-Length, so a chunked range answer is Malformed;
// chunked error answers and listings are decoded by csrc/http/chunked_body.*.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "http/fetch_result.hpp"

namespace blob2gpu {

constexpr size_t kMaxResponseHeadBytes = 64 * 1024;  // status line + headers + blank line
constexpr size_t kMaxResponseHeaders = 128;
constexpr int64_t kMaxContentLength = int64_t{1} << 50;  // 1 PiB: larger is a corrupt header

struct ResponseHead {
  int version_minor = 1;  // HTTP/1.<minor>
  int status = 0;
  std::string reason;
  HeaderList headers;  // names lower-cased, values without surrounding whitespace, in order
  int64_t content_length = -1;    // -1: no Content-Length
  bool transfer_encoded = false;  // a Transfer-Encoding header (chunked or another coding)
  bool chunked = false;    // ... whose last coding is chunked (the only one a body is read in)
  bool keep_alive = true;  // HTTP/1.1 without "Connection: close"; HTTP/1.0 never

  const std::string* header(std::string_view name) const;
};

enum class HeadState { Incomplete, Complete, Malformed };

struct HeadOutcome {
  HeadState state = HeadState::Incomplete;
  size_t head_bytes = 0;  // Complete: the head's length, its blank line included
  std::string problem;    // Malformed: what is wrong, for people
};

// Looks for the end of a response head at the start of data[0, n): Incomplete while there is none
// (and n is under the cap), else parses it into *out. `scan_from` lets a caller that appends to
// the buffer skip what it already searched (the terminator may straddle the old end).
HeadOutcome parse_response_head(const char* data, size_t n, ResponseHead* out,
                                size_t scan_from = 0);

struct ContentRange {
  uint64_t first = 0;
  uint64_t last = 0;   // inclusive
  int64_t total = -1;  // -1: "*"
};

// Whether `s` is an HTTP token (a valid header name) / a valid header value (no control
// characters but HTAB): what a request's headers are checked against before they are sent.
bool is_http_token(std::string_view s);
bool is_http_field_value(std::string_view s);

// "bytes FIRST-LAST/TOTAL" (TOTAL may be "*"), FIRST <= LAST < TOTAL; nullopt when it is not.
std::optional<ContentRange> parse_content_range(std::string_view value);

struct BodyCheck {
  FetchFailure failure = FetchFailure::None;  // None, Malformed or RangeMismatch
  std::string problem;
  int64_t total_size = -1;  // the resource's size, when the answer says
};

// Whether a 2xx answer's body is exactly `length` bytes starting at resource byte `first_byte`
// (nullopt: the request asked for no range, so only the length is checked): a 206 with a matching
// Content-Range, or a 200 whose whole body is what was asked for. A body without a Content-Length
// or with a transfer coding is Malformed; one of another range or size is RangeMismatch.
BodyCheck check_range_answer(const ResponseHead& head, std::optional<uint64_t> first_byte,
                             uint64_t length);

}  // namespace blob2gpu
