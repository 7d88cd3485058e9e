#include "http/fetch_result.hpp"

namespace blob2gpu {

const char* fetch_failure_name(FetchFailure failure) {
  switch (failure) {
    case FetchFailure::None:
      return "NONE";
    case FetchFailure::Cancelled:
      return "CANCELLED";
    case FetchFailure::Dns:
      return "DNS";
    case FetchFailure::ConnectRefused:
      return "CONNECT_REFUSED";
    case FetchFailure::ConnectTimeout:
      return "CONNECT_TIMEOUT";
    case FetchFailure::ConnectFailed:
      return "CONNECT_FAILED";
    case FetchFailure::ProxyRefused:
      return "PROXY_REFUSED";
    case FetchFailure::TlsVerify:
      return "TLS_VERIFY";
    case FetchFailure::TlsHandshake:
      return "TLS_HANDSHAKE";
    case FetchFailure::Timeout:
      return "TIMEOUT";
    case FetchFailure::Reset:
      return "RESET";
    case FetchFailure::Malformed:
      return "MALFORMED";
    case FetchFailure::RangeMismatch:
      return "RANGE_MISMATCH";
  }
  return "UNKNOWN";
}

const std::string* RangeResult::header(std::string_view name) const {
  for (const auto& [key, value] : headers) {
    if (key.size() != name.size()) continue;
    bool same = true;
    for (size_t i = 0; i < key.size() && same; ++i) {
      char c = name[i];
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
      same = key[i] == c;  // stored names are lower-case
    }
    if (same) return &value;
  }
  return nullptr;
}

}  // namespace blob2gpu
