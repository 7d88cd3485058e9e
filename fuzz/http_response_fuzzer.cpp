// libFuzzer target for the native range reader's response reading (csrc/http/response_head.*,
// csrc/http/chunked_body.*). The input is what a server sends: a response head and whatever
// follows it. Nothing may throw or trip a sanitizer, and what comes out must hold independently of
// the parser's code: a parsed head ends at the first blank line and obeys its caps; feeding the
// bytes in pieces (as the reader does from a socket) gives the same answer as feeding them whole;
// a body check passes only for the framing that was asked for; a chunked body decodes the same
// whatever the pieces. Build and run with fuzz/run_fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "http/chunked_body.hpp"
#include "http/response_head.hpp"

namespace {

using blob2gpu::ChunkedDecoder;
using blob2gpu::FetchFailure;
using blob2gpu::HeadOutcome;
using blob2gpu::HeadState;
using blob2gpu::ResponseHead;

[[noreturn]] void violated(const char* what, const std::string& detail = "") {
  std::fprintf(stderr, "http_response_fuzzer: invariant violated: %s %s\n", what, detail.c_str());
  std::abort();
}

void require(bool holds, const char* what, const std::string& detail = "") {
  if (!holds) violated(what, detail);
}

bool is_lower_token(const std::string& name) {
  if (name.empty()) return false;
  for (char c : name) {
    if (c >= 'A' && c <= 'Z') return false;
  }
  return blob2gpu::is_http_token(name);
}

void check_head(const char* data, size_t n, const HeadOutcome& o, const ResponseHead& head) {
  require(o.head_bytes >= 4 && o.head_bytes <= n, "the head is inside the input");
  require(std::memcmp(data + o.head_bytes - 4, "\r\n\r\n", 4) == 0, "the head ends in CRLFCRLF");
  require(std::string_view(data, o.head_bytes - 2).find("\r\n\r\n") == std::string_view::npos,
          "the head ends at the first blank line");
  require(o.head_bytes <= blob2gpu::kMaxResponseHeadBytes, "the head is under its cap");
  require(head.status >= 100 && head.status <= 999, "a three-digit status");
  require(head.version_minor == 0 || head.version_minor == 1, "HTTP/1.0 or 1.1");
  require(head.version_minor == 1 || !head.keep_alive, "HTTP/1.0 is never kept alive");
  require(head.headers.size() <= blob2gpu::kMaxResponseHeaders, "at most the cap of headers");
  require(blob2gpu::is_http_field_value(head.reason), "no control character in the reason");
  for (const auto& [name, value] : head.headers) {
    require(is_lower_token(name), "header names are lower-case tokens", name);
    require(blob2gpu::is_http_field_value(value), "no control character in a value", name);
    require(value.empty() || (value.front() != ' ' && value.back() != ' '), "values trimmed");
  }
  require(head.content_length >= -1 && head.content_length <= blob2gpu::kMaxContentLength,
          "Content-Length in range");
  require(!(head.transfer_encoded && head.content_length >= 0),
          "never both Transfer-Encoding and Content-Length");
  require(!head.chunked || head.transfer_encoded, "chunked only with Transfer-Encoding");
  require((head.content_length >= 0) == (head.header("content-length") != nullptr),
          "Content-Length parsed exactly when present");
}

void check_body_checks(const ResponseHead& head) {
  uint64_t lengths[] = {1, 4,
                        static_cast<uint64_t>(head.content_length > 0 ? head.content_length : 1)};
  std::optional<uint64_t> starts[] = {std::nullopt, 0, 10};
  if (const std::string* range = head.header("content-range")) {
    if (auto parsed = blob2gpu::parse_content_range(*range)) starts[2] = parsed->first;
  }
  for (uint64_t length : lengths) {
    for (auto first : starts) {
      blob2gpu::BodyCheck c = blob2gpu::check_range_answer(head, first, length);
      require(c.failure == FetchFailure::None || c.failure == FetchFailure::Malformed ||
                  c.failure == FetchFailure::RangeMismatch,
              "a body check fails as Malformed or RangeMismatch");
      if (c.failure != FetchFailure::None) continue;
      require(head.status == 200 || head.status == 206, "only 200 and 206 carry a range");
      require(!head.transfer_encoded, "a range body has no transfer coding");
      require(head.content_length == static_cast<int64_t>(length), "the body is the length asked");
      const std::string* range = head.header("content-range");
      if (first && range) {
        auto parsed = blob2gpu::parse_content_range(*range);
        require(parsed && parsed->first == *first, "the range starts where it was asked");
      }
      if (first && !range) require(head.status == 200 && *first == 0, "a whole 200 from 0 only");
    }
  }
}

void check_content_ranges(const ResponseHead& head) {
  for (const auto& [name, value] : head.headers) {
    if (auto r = blob2gpu::parse_content_range(value)) {
      require(r->first <= r->last, "first <= last", value);
      require(r->total == -1 || static_cast<uint64_t>(r->total) > r->last, "last < total", value);
    }
  }
}

// Feeds data[0, n) to a decoder in pieces of `piece` bytes; the kept output and how it ended.
struct Decoded {
  ChunkedDecoder::State state = ChunkedDecoder::State::More;
  std::string kept;
  size_t used = 0;
  uint64_t body = 0;
};

Decoded decode(const char* data, size_t n, size_t piece) {
  constexpr uint64_t kCap = 1024;
  constexpr size_t kKeep = 64;
  ChunkedDecoder decoder(kCap);
  Decoded d;
  size_t at = 0;
  while (at < n) {
    size_t take = n - at < piece ? n - at : piece;
    size_t consumed = 0;
    d.state = decoder.feed(data + at, take, &consumed, &d.kept, kKeep);
    require(consumed <= take, "the decoder consumes at most what it was given");
    require(d.kept.size() <= kKeep, "the decoder keeps at most `keep` bytes");
    require(decoder.body_bytes() <= kCap, "the decoded body is under its cap");
    at += consumed;
    if (d.state != ChunkedDecoder::State::More) break;
    require(consumed == take, "a decoder that wants more used all it was given");
  }
  d.used = at;
  d.body = decoder.body_bytes();
  if (d.state == ChunkedDecoder::State::Malformed) {
    size_t consumed = 0;
    require(
        decoder.feed("0\r\n\r\n", 5, &consumed, &d.kept, kKeep) == ChunkedDecoder::State::Malformed,
        "a malformed body stays malformed");
  }
  return d;
}

void check_chunked(const char* data, size_t n, size_t piece) {
  Decoded whole = decode(data, n, n == 0 ? 1 : n);
  Decoded pieces = decode(data, n, piece);
  require(whole.state == pieces.state, "chunked: the same outcome whatever the pieces");
  if (whole.state == ChunkedDecoder::State::Malformed) return;
  require(whole.kept == pieces.kept && whole.body == pieces.body, "chunked: the same bytes");
  if (whole.state == ChunkedDecoder::State::Done) {
    require(whole.used == pieces.used, "chunked: ends at the same byte");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* raw, size_t size) {
  const char* data = reinterpret_cast<const char*>(raw);
  ResponseHead whole;
  HeadOutcome full = blob2gpu::parse_response_head(data, size, &whole);
  if (full.state == HeadState::Complete) {
    check_head(data, size, full, whole);
    check_body_checks(whole);
    check_content_ranges(whole);
  } else if (full.state == HeadState::Malformed) {
    require(!full.problem.empty(), "a malformed head says what is wrong");
  }

  // As the reader sees it: the bytes arrive in pieces, each parse scanning only what is new.
  size_t piece = 1 + (size > 0 ? raw[0] % 61 : 0);
  size_t have = 0;
  ResponseHead partial;
  HeadOutcome last;
  while (have < size) {
    size_t scanned = have;
    have = size - have < piece ? size : have + piece;
    last = blob2gpu::parse_response_head(data, have, &partial, scanned);
    if (last.state != HeadState::Incomplete) break;
  }
  if (size > 0) {
    require(last.state == full.state, "pieces or whole: the same outcome");
    if (full.state == HeadState::Complete) {
      require(last.head_bytes == full.head_bytes && partial.status == whole.status &&
                  partial.headers == whole.headers &&
                  partial.content_length == whole.content_length,
              "pieces or whole: the same head");
    }
  }

  // What follows a head is a body; a chunked decoder reads any bytes without harm.
  size_t body_at = full.state == HeadState::Complete ? full.head_bytes : 0;
  check_chunked(data + body_at, size - body_at, piece);
  return 0;
}
