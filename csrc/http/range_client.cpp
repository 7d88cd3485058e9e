#include "http/range_client.hpp"

#include <chrono>
#include <cstring>

#include "errors.hpp"
#include "http/chunked_body.hpp"
#include "http/response_head.hpp"

namespace blob2gpu {
namespace {

using Clock = std::chrono::steady_clock;

int64_t nanos_since(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
}

std::string authority(const std::string& host, uint16_t port) {
  bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

bool iequals(const std::string& a, const char* b) {
  size_t n = std::strlen(b);
  if (a.size() != n) return false;
  for (size_t i = 0; i < n; ++i) {
    char c = a[i];
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    if (c != b[i]) return false;
  }
  return true;
}

// Headers whose value the client sets itself, or that would change the message's framing.
bool owned_by_client(const std::string& name) {
  for (const char* owned :
       {"host", "connection", "content-length", "transfer-encoding", "proxy-authorization"}) {
    if (iequals(name, owned)) return true;
  }
  return false;
}

constexpr size_t kHeadBufferBytes = 16 * 1024;
constexpr int kMaxInterimAnswers = 8;  // 1xx heads skipped before the real answer

// How reading a framed body ended: failure None when it ended where the answer said.
struct BodyRead {
  FetchFailure failure = FetchFailure::None;
  std::string problem;
};

// Reads an answer's body, framed by Content-Length or chunked, at most max_read decoded bytes,
// keeping its first `keep` in *kept; buffer[from, have) holds the bytes that came with the head.
// A body over max_read, unframed (until close) or in another coding is Malformed, one cut short
// Reset; after either the connection carries nothing more. Throws TransportError when the
// connection fails.
BodyRead read_framed_body(Connection& connection, const ResponseHead& answer,
                          std::vector<char>& buffer, size_t from, size_t have, size_t max_read,
                          size_t keep, std::string* kept) {
  auto fail = [](FetchFailure failure, std::string problem) {
    return BodyRead{failure, std::move(problem)};
  };
  if (answer.chunked) {
    ChunkedDecoder decoder(max_read);
    for (;;) {
      size_t consumed = 0;
      auto state = decoder.feed(buffer.data() + from, have - from, &consumed, kept, keep);
      if (state == ChunkedDecoder::State::Done) {
        if (from + consumed == have) return {};
        return fail(FetchFailure::Malformed, "bytes after the chunked body's end");
      }
      if (state == ChunkedDecoder::State::Malformed) {
        return fail(FetchFailure::Malformed, "chunked body: " + decoder.problem());
      }
      from = 0;
      have = connection.recv_some(buffer.data(), buffer.size());
      if (have == 0) return fail(FetchFailure::Reset, "the connection closed inside the body");
    }
  }
  size_t early = have - from;
  kept->assign(buffer.data() + from, std::min(early, keep));
  if (answer.transfer_encoded || answer.content_length < 0) {
    return fail(FetchFailure::Malformed, "the body has no Content-Length and is not chunked");
  }
  if (static_cast<uint64_t>(answer.content_length) > max_read) {
    return fail(FetchFailure::Malformed, "the body is " + std::to_string(answer.content_length) +
                                             " bytes, more than the " + std::to_string(max_read) +
                                             " read");
  }
  size_t left = static_cast<size_t>(answer.content_length);
  if (early > left) return fail(FetchFailure::Malformed, "more bytes than the Content-Length");
  left -= early;
  while (left > 0) {
    size_t got = connection.recv_some(buffer.data(), std::min(left, buffer.size()));
    if (got == 0) return fail(FetchFailure::Reset, "the connection closed inside the body");
    if (kept->size() < keep) kept->append(buffer.data(), std::min(got, keep - kept->size()));
    left -= got;
  }
  return {};
}

}  // namespace

RangeClient::RangeClient(ConnectTarget target, const std::string& ca_file, size_t pool_size)
    : target_(std::move(target)), pool_size_(pool_size) {
  if (target_.host.empty() || target_.port == 0) {
    throw CoreError(ErrorKind::InvalidArgument, "a range client needs a host and a port");
  }
  if (!target_.proxy_host.empty() && target_.proxy_port == 0) {
    throw CoreError(ErrorKind::InvalidArgument, "a proxy needs a port");
  }
  if (!is_http_field_value(target_.proxy_authorization) || !is_http_field_value(target_.host) ||
      !is_http_field_value(target_.proxy_host)) {
    throw CoreError(ErrorKind::InvalidArgument,
                    "the host, proxy or proxy authorization holds a control character");
  }
  if (target_.connect_timeout.count() <= 0 || target_.read_timeout.count() <= 0) {
    throw CoreError(ErrorKind::InvalidArgument, "timeouts must be positive");
  }
  if (target_.tls) tls_ = std::make_unique<TlsContext>(ca_file);
}

RangeClient::~RangeClient() {
  close();
}

void RangeClient::close() {
  wake_.fire();
  std::vector<std::unique_ptr<Connection>> idle;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    idle.swap(idle_);
  }
}

size_t RangeClient::idle_connections() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return idle_.size();
}

std::string RangeClient::tls_library() const {
  if (!tls_) return "";
  const OpenSsl& ssl = tls_->api();
  return ssl.version + " (" + ssl.library + (ssl.already_loaded ? ", the process's copy)" : ")");
}

std::unique_ptr<Connection> RangeClient::checkout(bool fresh, bool* reused, int* proxy_status) {
  *reused = false;
  while (!fresh) {
    std::unique_ptr<Connection> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_.empty()) break;
      idle = std::move(idle_.back());
      idle_.pop_back();
    }
    if (idle->idle_and_open()) {
      *reused = true;
      return idle;
    }
    idle->mark_broken();  // the server closed it while it idled
  }
  auto connection = Connection::open(target_, tls_.get(), wake_, proxy_status);
  connections_opened_.fetch_add(1);
  return connection;
}

void RangeClient::checkin(std::unique_ptr<Connection> connection) {
  if (wake_.fired()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  if (idle_.size() < pool_size_) idle_.push_back(std::move(connection));
}

std::string RangeClient::request_head(const std::string& target, const HeaderList& headers) const {
  if (target.empty() || target[0] != '/') {
    throw CoreError(ErrorKind::InvalidArgument, "a request target must start with '/'");
  }
  for (char c : target) {
    if (c <= 0x20 || c >= 0x7f) {
      throw CoreError(ErrorKind::InvalidArgument,
                      "a request target holds a space or a control character (percent-encode "
                      "it)");
    }
  }
  bool default_port = target_.port == (target_.tls ? 443 : 80);
  std::string host =
      default_port
          ? (target_.host.find(':') != std::string::npos ? "[" + target_.host + "]" : target_.host)
          : authority(target_.host, target_.port);
  bool absolute = !target_.tls && !target_.proxy_host.empty();  // plain HTTP through a proxy
  std::string head = "GET " + (absolute ? "http://" + host : std::string()) + target +
                     " HTTP/1.1\r\nHost: " + host + "\r\n";
  if (absolute && !target_.proxy_authorization.empty()) {
    head += "Proxy-Authorization: " + target_.proxy_authorization + "\r\n";
  }
  for (const auto& [name, value] : headers) {
    if (!is_http_token(name) || !is_http_field_value(value)) {
      throw CoreError(ErrorKind::InvalidArgument,
                      "request header '" + (is_http_token(name) ? name : std::string("?")) +
                          "' has a name or value that cannot be sent (a control character?)");
    }
    if (owned_by_client(name)) {
      throw CoreError(ErrorKind::InvalidArgument,
                      "request header '" + name + "' is the range client's to set");
    }
    head += name + ": " + value + "\r\n";
  }
  head += "\r\n";
  return head;
}

RangeResult RangeClient::get_into(const std::string& target, const HeaderList& headers,
                                  uint8_t* dst, size_t length, std::optional<uint64_t> first_byte) {
  if (length == 0) throw CoreError(ErrorKind::InvalidArgument, "get_into needs a non-empty buffer");
  return send(request_head(target, headers), Body{dst, length, first_byte, nullptr, 0});
}

RangeResult RangeClient::get_document(const std::string& target, const HeaderList& headers,
                                      size_t max_bytes, std::string* document) {
  if (max_bytes == 0) {
    throw CoreError(ErrorKind::InvalidArgument, "get_document needs a positive size limit");
  }
  document->clear();
  RangeResult result =
      send(request_head(target, headers), Body{nullptr, 0, std::nullopt, document, max_bytes});
  bool whole = result.failure == FetchFailure::None && result.status >= 200 && result.status <= 299;
  if (!whole) document->clear();
  return result;
}

RangeResult RangeClient::send(const std::string& head, const Body& body) {
  Clock::time_point start = Clock::now();
  requests_.fetch_add(1);
  RangeResult result;
  for (bool fresh = false;; fresh = true) {
    result = RangeResult{};
    std::unique_ptr<Connection> connection;
    int proxy_status = 0;
    try {
      connection = checkout(fresh, &result.reused_connection, &proxy_status);
    } catch (const TransportError& e) {
      result.failure = e.kind();
      result.detail = e.detail();
      result.status = proxy_status;
      result.at_proxy = e.at_proxy();
      break;
    }
    result.connect_ns = nanos_since(start);
    bool answered = false;
    try {
      bool keep = exchange(*connection, head, body, &result, &answered);
      if (keep) checkin(std::move(connection));
      break;
    } catch (const TransportError& e) {
      connection->mark_broken();
      // A kept-alive connection the server closed as the request went out: no byte of an
      // answer came, so the GET is sent again, once, on a new connection.
      if (result.reused_connection && !answered && e.kind() == FetchFailure::Reset) continue;
      result.failure = e.kind();
      result.detail = e.detail();
      break;
    }
  }
  result.total_ns = nanos_since(start);
  return result;
}

bool RangeClient::exchange(Connection& connection, const std::string& head, const Body& body,
                           RangeResult* result, bool* answered) {
  connection.send_all(head.data(), head.size());
  Clock::time_point sent = Clock::now();

  std::vector<char> buffer(kHeadBufferBytes);
  size_t have = 0, scanned = 0;
  ResponseHead answer;
  HeadOutcome outcome;
  int interim = 0;
  for (;;) {
    outcome = parse_response_head(buffer.data(), have, &answer, scanned);
    scanned = have;
    if (outcome.state == HeadState::Malformed) {
      throw TransportError(FetchFailure::Malformed, "malformed answer: " + outcome.problem);
    }
    if (outcome.state == HeadState::Complete) {
      if (answer.status == 101) {
        throw TransportError(FetchFailure::Malformed, "the server switched protocols (HTTP 101)");
      }
      if (answer.status >= 200) break;
      if (++interim > kMaxInterimAnswers) {
        throw TransportError(FetchFailure::Malformed, "too many interim (1xx) answers");
      }
      // An interim answer (100 Continue, 103 Early Hints): the real one follows.
      std::memmove(buffer.data(), buffer.data() + outcome.head_bytes, have - outcome.head_bytes);
      have -= outcome.head_bytes;
      scanned = 0;
      continue;
    }
    if (have == buffer.size()) buffer.resize(std::min(buffer.size() * 2, kMaxResponseHeadBytes));
    size_t got = connection.recv_some(buffer.data() + have, buffer.size() - have);
    if (got == 0) {
      throw TransportError(FetchFailure::Reset,
                           *answered ? "the server closed the connection inside the answer's head"
                                     : "the server closed the connection without answering");
    }
    if (!*answered) {
      *answered = true;
      result->first_byte_ns =
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - sent).count();
    }
    have += got;
  }

  result->status = answer.status;
  result->reason = answer.reason;
  result->headers = answer.headers;
  result->content_length = answer.content_length;
  size_t early = have - outcome.head_bytes;  // body bytes that came with the head

  if (answer.status >= 200 && answer.status <= 299 && body.document != nullptr) {
    if (answer.status == 204) return answer.keep_alive && early == 0;
    BodyRead read = read_framed_body(connection, answer, buffer, outcome.head_bytes, have,
                                     body.document_max, body.document_max, body.document);
    if (read.failure != FetchFailure::None) throw TransportError(read.failure, read.problem);
    result->bytes_received = body.document->size();
    return answer.keep_alive;
  }
  if (answer.status >= 200 && answer.status <= 299) {
    const size_t length = body.length;
    BodyCheck check = check_range_answer(answer, body.first_byte, length);
    result->total_size = check.total_size;
    if (check.failure != FetchFailure::None) throw TransportError(check.failure, check.problem);
    if (early > length) {
      throw TransportError(FetchFailure::Malformed, "the server sent more than its Content-Length");
    }
    uint8_t* dst = body.dst;
    std::memcpy(dst, buffer.data() + outcome.head_bytes, early);
    result->bytes_received = early;
    while (result->bytes_received < length) {
      size_t got =
          connection.recv_some(dst + result->bytes_received, length - result->bytes_received);
      if (got == 0) {
        throw TransportError(FetchFailure::Reset, "the connection closed after " +
                                                      std::to_string(result->bytes_received) +
                                                      " of " + std::to_string(length) +
                                                      " body bytes");
      }
      result->bytes_received += got;
    }
    return answer.keep_alive;
  }

  // An error answer: keep the start of its body (the service's error document), and the
  // connection when the body is short and framed.
  if (answer.status == 204 || answer.status == 304) return answer.keep_alive && early == 0;
  try {
    BodyRead read = read_framed_body(connection, answer, buffer, outcome.head_bytes, have,
                                     kMaxDrainedErrorBytes, kErrorBodyBytes, &result->error_body);
    return read.failure == FetchFailure::None && answer.keep_alive;
  } catch (const TransportError&) {
    // The status and headers are the answer; its body is only for people: drop the connection.
    connection.mark_broken();
    return false;
  }
}

}  // namespace blob2gpu
