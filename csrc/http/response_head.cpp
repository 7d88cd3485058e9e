#include "http/response_head.hpp"

#include <cstring>

namespace blob2gpu {
namespace {

char lower(char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

// RFC 9110 tchar.
bool is_token_char(unsigned char c) {
  if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
  return c != 0 && std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

// field-vchar, SP, HTAB, obs-text: anything but the other control characters and DEL.
bool is_value_char(unsigned char c) {
  return c == '\t' || (c >= 0x20 && c != 0x7f);
}

bool is_space(char c) {
  return c == ' ' || c == '\t';
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// Digits only, no sign, no overflow past `limit`.
std::optional<uint64_t> parse_decimal(std::string_view s, uint64_t limit) {
  if (s.empty() || s.size() > 19) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v > limit) return std::nullopt;
  return v;
}

// Each comma-separated element of a list header, trimmed; empty elements skipped.
template <typename Fn>
void for_each_element(std::string_view value, Fn fn) {
  while (!value.empty()) {
    size_t comma = value.find(',');
    std::string_view element = trim(value.substr(0, comma));
    if (!element.empty()) fn(element);
    if (comma == std::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
}

HeadOutcome malformed(std::string problem) {
  HeadOutcome o;
  o.state = HeadState::Malformed;
  o.problem = std::move(problem);
  return o;
}

// "HTTP/1.x SSS reason" (the reason may be empty, and so may the space before it).
bool parse_status_line(std::string_view line, ResponseHead* out, std::string* problem) {
  constexpr std::string_view kPrefix = "HTTP/1.";
  if (line.size() < kPrefix.size() + 5 || line.substr(0, kPrefix.size()) != kPrefix) {
    *problem = "the status line does not start with HTTP/1.x";
    return false;
  }
  char minor = line[kPrefix.size()];
  if (minor != '0' && minor != '1') {
    *problem = "the status line's HTTP version is not 1.0 or 1.1";
    return false;
  }
  out->version_minor = minor - '0';
  std::string_view rest = line.substr(kPrefix.size() + 1);
  if (rest[0] != ' ') {
    *problem = "the status line has no space after the version";
    return false;
  }
  std::string_view code = rest.substr(1, 3);
  if (code.size() != 3 || code[0] < '1' || code[0] > '9' || code[1] < '0' || code[1] > '9' ||
      code[2] < '0' || code[2] > '9') {
    *problem = "the status code is not three digits";
    return false;
  }
  out->status = (code[0] - '0') * 100 + (code[1] - '0') * 10 + (code[2] - '0');
  std::string_view reason = rest.substr(4);
  if (!reason.empty()) {
    if (reason[0] != ' ') {
      *problem = "the status code is followed by something other than a space";
      return false;
    }
    reason.remove_prefix(1);
  }
  for (char c : reason) {
    if (!is_value_char(static_cast<unsigned char>(c))) {
      *problem = "the reason phrase holds a control character";
      return false;
    }
  }
  out->reason.assign(reason);
  out->keep_alive = out->version_minor == 1;
  return true;
}

bool parse_header_line(std::string_view line, ResponseHead* out, std::string* problem) {
  if (is_space(line[0])) {
    *problem = "a header line is folded (obsolete line folding is refused)";
    return false;
  }
  size_t colon = line.find(':');
  if (colon == std::string_view::npos || colon == 0) {
    *problem = "a header line has no name followed by ':'";
    return false;
  }
  std::string name(line.substr(0, colon));
  for (char& c : name) {
    if (!is_token_char(static_cast<unsigned char>(c))) {
      *problem = "a header name holds a character that is not allowed (or space before ':')";
      return false;
    }
    c = lower(c);
  }
  std::string_view value = trim(line.substr(colon + 1));
  for (char c : value) {
    if (!is_value_char(static_cast<unsigned char>(c))) {
      *problem = "header '" + name + "' holds a control character";
      return false;
    }
  }
  if (name == "content-length") {
    bool ok = true;
    for_each_element(value, [&](std::string_view element) {
      auto n = parse_decimal(element, static_cast<uint64_t>(kMaxContentLength));
      if (!n || (out->content_length >= 0 && out->content_length != static_cast<int64_t>(*n))) {
        ok = false;
      } else {
        out->content_length = static_cast<int64_t>(*n);
      }
    });
    if (!ok || out->content_length < 0) {
      *problem = "Content-Length is not one non-negative number (or its copies disagree)";
      return false;
    }
  } else if (name == "transfer-encoding") {
    out->transfer_encoded = true;
    for_each_element(value, [&](std::string_view element) {
      out->chunked = iequals(element, "chunked");  // the last coding is what frames the body
    });
  } else if (name == "connection") {
    for_each_element(value, [&](std::string_view element) {
      if (iequals(element, "close")) out->keep_alive = false;
    });
  }
  if (out->headers.size() >= kMaxResponseHeaders) {
    *problem = "the answer has more than " + std::to_string(kMaxResponseHeaders) + " headers";
    return false;
  }
  out->headers.emplace_back(std::move(name), std::string(value));
  return true;
}

}  // namespace

bool is_http_token(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!is_token_char(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

bool is_http_field_value(std::string_view s) {
  for (char c : s) {
    if (!is_value_char(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

const std::string* ResponseHead::header(std::string_view name) const {
  for (const auto& [key, value] : headers) {
    if (iequals(key, name)) return &value;
  }
  return nullptr;
}

HeadOutcome parse_response_head(const char* data, size_t n, ResponseHead* out, size_t scan_from) {
  // The blank line that ends the head; a terminator may straddle what was scanned before.
  size_t limit = n < kMaxResponseHeadBytes ? n : kMaxResponseHeadBytes;
  size_t start = scan_from > 3 ? scan_from - 3 : 0;
  size_t end = std::string_view::npos;
  std::string_view all(data, limit);
  size_t found = all.find("\r\n\r\n", start);
  if (found != std::string_view::npos) end = found + 4;
  if (end == std::string_view::npos) {
    if (n >= kMaxResponseHeadBytes) {
      return malformed("the response head is longer than " +
                       std::to_string(kMaxResponseHeadBytes / 1024) + " KiB");
    }
    HeadOutcome o;
    o.state = HeadState::Incomplete;
    return o;
  }

  *out = ResponseHead{};
  std::string problem;
  std::string_view head(data, end - 2);  // every line, each with its CRLF
  bool first = true;
  while (!head.empty()) {
    size_t eol = head.find("\r\n");
    std::string_view line = head.substr(0, eol);
    head.remove_prefix(eol + 2);
    if (line.find('\n') != std::string_view::npos || line.find('\r') != std::string_view::npos) {
      return malformed("a line ends in a bare CR or LF, not CRLF");
    }
    bool ok = first ? parse_status_line(line, out, &problem)
                    : (!line.empty() && parse_header_line(line, out, &problem));
    if (!ok) return malformed(problem.empty() ? "an empty header line" : problem);
    first = false;
  }
  if (out->transfer_encoded && out->content_length >= 0) {
    return malformed("the answer has both Transfer-Encoding and Content-Length");
  }
  HeadOutcome o;
  o.state = HeadState::Complete;
  o.head_bytes = end;
  return o;
}

std::optional<ContentRange> parse_content_range(std::string_view value) {
  constexpr std::string_view kUnit = "bytes ";
  if (value.substr(0, kUnit.size()) != kUnit) return std::nullopt;
  value.remove_prefix(kUnit.size());
  size_t dash = value.find('-');
  size_t slash = value.find('/');
  if (dash == std::string_view::npos || slash == std::string_view::npos || slash < dash) {
    return std::nullopt;
  }
  constexpr uint64_t kLimit = static_cast<uint64_t>(kMaxContentLength);
  auto first = parse_decimal(value.substr(0, dash), kLimit);
  auto last = parse_decimal(value.substr(dash + 1, slash - dash - 1), kLimit);
  if (!first || !last || *first > *last) return std::nullopt;
  ContentRange range;
  range.first = *first;
  range.last = *last;
  std::string_view total = value.substr(slash + 1);
  if (total != "*") {
    auto t = parse_decimal(total, kLimit);
    if (!t || *last >= *t) return std::nullopt;
    range.total = static_cast<int64_t>(*t);
  }
  return range;
}

BodyCheck check_range_answer(const ResponseHead& head, std::optional<uint64_t> first_byte,
                             uint64_t length) {
  BodyCheck check;
  auto fail = [&](FetchFailure failure, std::string problem) {
    check.failure = failure;
    check.problem = std::move(problem);
    return check;
  };
  if (head.transfer_encoded) {
    return fail(FetchFailure::Malformed,
                "the body has a transfer coding (chunked?); a range body must have a "
                "Content-Length");
  }
  if (head.content_length < 0) {
    return fail(FetchFailure::Malformed, "the answer has no Content-Length");
  }
  const std::string* range_header = head.header("content-range");
  std::optional<ContentRange> range;
  if (range_header != nullptr) {
    range = parse_content_range(*range_header);
    if (!range) return fail(FetchFailure::Malformed, "Content-Range is not bytes FIRST-LAST/SIZE");
    check.total_size = range->total;
    if (range->last - range->first + 1 != static_cast<uint64_t>(head.content_length)) {
      return fail(FetchFailure::Malformed, "Content-Range and Content-Length disagree");
    }
  }
  if (head.status == 200 && !range) {
    check.total_size = head.content_length;  // the whole resource
    if (first_byte.value_or(0) != 0 || static_cast<uint64_t>(head.content_length) != length) {
      return fail(FetchFailure::RangeMismatch, "the server sent the whole resource (" +
                                                   std::to_string(head.content_length) +
                                                   " bytes, HTTP 200), not the range asked for");
    }
    return check;
  }
  if (head.status != 206 && head.status != 200) {
    return fail(FetchFailure::RangeMismatch,
                "HTTP " + std::to_string(head.status) + " carries no range body");
  }
  if (first_byte && !range) {
    return fail(FetchFailure::RangeMismatch, "a 206 answer without Content-Range");
  }
  if (static_cast<uint64_t>(head.content_length) != length ||
      (first_byte && range->first != *first_byte)) {
    std::string got =
        range ? "bytes " + std::to_string(range->first) + "-" + std::to_string(range->last)
              : std::to_string(head.content_length) + " bytes";
    std::string asked = first_byte && length > 0 ? "bytes " + std::to_string(*first_byte) + "-" +
                                                       std::to_string(*first_byte + length - 1)
                                                 : std::to_string(length) + " bytes";
    return fail(FetchFailure::RangeMismatch, "the answer holds " + got + ", not " + asked);
  }
  return check;
}

}  // namespace blob2gpu
