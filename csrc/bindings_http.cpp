// The native range reader in blob2gpu._core: RangeClient (csrc/http/range_client.*), its
// RangeResult and the FetchFailure kinds. get_into() holds the GIL only to read its arguments and
// to build the result: the connection, the request and every byte of the body are handled with
// the GIL released, straight into the caller's buffer (a Landing's view, or any writable buffer).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <optional>
#include <string>

#include "bindings_gil.hpp"
#include "errors.hpp"
#include "http/fetch_result.hpp"
#include "http/range_client.hpp"

namespace py = pybind11;
using namespace blob2gpu;

namespace {

// A writable, C-contiguous view of an object's buffer, released when it goes out of scope; the
// exporter cannot resize or free the memory while it is held, so the GIL may be dropped.
class WritableBuffer {
 public:
  explicit WritableBuffer(py::handle obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_WRITABLE) != 0) throw py::error_already_set();
  }
  ~WritableBuffer() { PyBuffer_Release(&view_); }
  WritableBuffer(const WritableBuffer&) = delete;
  WritableBuffer& operator=(const WritableBuffer&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

Millis millis(double seconds, const char* name) {
  if (!(seconds > 0) || seconds > 86400.0 * 365) {
    throw CoreError(ErrorKind::InvalidArgument, std::string(name) +
                                                    " must be a positive number "
                                                    "of seconds");
  }
  auto ms = static_cast<int64_t>(seconds * 1000.0);
  return Millis(ms < 1 ? 1 : ms);
}

uint16_t port_number(int port, const char* name) {
  if (port < 1 || port > 65535) {
    throw CoreError(ErrorKind::InvalidArgument, std::string(name) + " must be 1-65535");
  }
  return static_cast<uint16_t>(port);
}

std::shared_ptr<RangeClient> make_client(const std::string& host, int port, bool tls,
                                         const std::optional<std::string>& ca_file,
                                         const std::optional<std::string>& proxy_host,
                                         int proxy_port,
                                         const std::optional<std::string>& proxy_authorization,
                                         double connect_timeout, double read_timeout,
                                         size_t pool_size) {
  ConnectTarget target;
  target.host = host;
  target.port = port_number(port, "port");
  target.tls = tls;
  if (proxy_host) {
    target.proxy_host = *proxy_host;
    target.proxy_port = port_number(proxy_port, "proxy_port");
  }
  target.proxy_authorization = proxy_authorization.value_or("");
  target.connect_timeout = millis(connect_timeout, "connect_timeout");
  target.read_timeout = millis(read_timeout, "read_timeout");
  std::string bundle = ca_file.value_or("");
  if (!tls && !bundle.empty()) {
    throw CoreError(ErrorKind::InvalidArgument, "ca_file is for HTTPS (tls=True) only");
  }
  BlockingCall blocking;  // loading OpenSSL and a CA bundle reads files
  return std::make_shared<RangeClient>(std::move(target), bundle, pool_size);
}

}  // namespace

void register_http_bindings(py::module_& m) {
  py::enum_<FetchFailure>(m, "FetchFailure",
                          "Why a ranged GET got no whole answer (RangeResult.failure); NONE when "
                          "the server answered.")
      .value("NONE", FetchFailure::None)
      .value("CANCELLED", FetchFailure::Cancelled)
      .value("DNS", FetchFailure::Dns)
      .value("CONNECT_REFUSED", FetchFailure::ConnectRefused)
      .value("CONNECT_TIMEOUT", FetchFailure::ConnectTimeout)
      .value("CONNECT_FAILED", FetchFailure::ConnectFailed)
      .value("PROXY_REFUSED", FetchFailure::ProxyRefused)
      .value("TLS_VERIFY", FetchFailure::TlsVerify)
      .value("TLS_HANDSHAKE", FetchFailure::TlsHandshake)
      .value("TIMEOUT", FetchFailure::Timeout)
      .value("RESET", FetchFailure::Reset)
      .value("MALFORMED", FetchFailure::Malformed)
      .value("RANGE_MISMATCH", FetchFailure::RangeMismatch);

  py::class_<RangeResult>(
      m, "RangeResult",
      "What one RangeClient.get_into() or get_document() came to: the answer's status and "
      "headers, the body bytes that landed, timings, and a typed failure.")
      .def_readonly("failure", &RangeResult::failure)
      .def_readonly("detail", &RangeResult::detail)
      .def_readonly("status", &RangeResult::status)
      .def_readonly("at_proxy", &RangeResult::at_proxy)
      .def_readonly("reason", &RangeResult::reason)
      .def_readonly("headers", &RangeResult::headers)
      .def_readonly("bytes_received", &RangeResult::bytes_received)
      .def_readonly("content_length", &RangeResult::content_length)
      .def_readonly("total_size", &RangeResult::total_size)
      .def_property_readonly("error_body",
                             [](const RangeResult& r) { return py::bytes(r.error_body); })
      .def_readonly("reused_connection", &RangeResult::reused_connection)
      .def_readonly("connect_ns", &RangeResult::connect_ns)
      .def_readonly("first_byte_ns", &RangeResult::first_byte_ns)
      .def_readonly("total_ns", &RangeResult::total_ns)
      .def_property_readonly(
          "ok",
          [](const RangeResult& r) {
            return r.failure == FetchFailure::None && r.status >= 200 && r.status <= 299;
          },
          "Whether the whole answer landed: an answered 2xx whose body filled the buffer (or, "
          "for get_document(), was read whole).")
      .def(
          "header",
          [](const RangeResult& r, const std::string& name) -> py::object {
            const std::string* value = r.header(name);
            return value ? py::object(py::str(*value)) : py::object(py::none());
          },
          py::arg("name"), "The answer's first header `name` (case-insensitive), or None.")
      .def("__repr__", [](const RangeResult& r) {
        return "RangeResult(failure=" + std::string(fetch_failure_name(r.failure)) +
               ", status=" + std::to_string(r.status) +
               ", bytes_received=" + std::to_string(r.bytes_received) + ")";
      });

  py::class_<RangeClient, std::shared_ptr<RangeClient>>(
      m, "RangeClient",
      "The core's HTTP/1.1 range reader for one endpoint: keep-alive connections, TLS from the "
      "process's OpenSSL, bodies read without the GIL straight into the caller's buffer.")
      .def(py::init(&make_client), py::arg("host"), py::arg("port"), py::kw_only(),
           py::arg("tls") = false, py::arg("ca_file") = py::none(),
           py::arg("proxy_host") = py::none(), py::arg("proxy_port") = 0,
           py::arg("proxy_authorization") = py::none(), py::arg("connect_timeout") = 20.0,
           py::arg("read_timeout") = 60.0, py::arg("pool_size") = 8,
           "tls: HTTPS, verifying the certificate and host (ca_file: a PEM bundle trusted "
           "instead of OpenSSL's default locations); proxy_host/proxy_port: a forward proxy "
           "(a CONNECT tunnel for HTTPS), proxy_authorization its Proxy-Authorization value; "
           "pool_size: idle connections kept. Raises InvalidArgument, or SourceUnavailable when "
           "HTTPS is asked for and OpenSSL or the bundle cannot be loaded.")
      .def(
          "get_into",
          [](RangeClient& client, const std::string& target, const HeaderList& headers,
             const py::object& buffer, std::optional<uint64_t> first_byte) {
            WritableBuffer view(buffer);
            BlockingCall blocking;
            return client.get_into(target, headers, view.data(), view.size(), first_byte);
          },
          py::arg("target"), py::arg("headers"), py::arg("buffer"), py::kw_only(),
          py::arg("first_byte") = py::none(),
          "GET `target` (path and query) with `headers` (name, value pairs: the caller signs), "
          "writing the body into the whole of `buffer` (a writable buffer: a Landing's view, a "
          "bytearray, a memoryview slice). first_byte: where the request's range starts, "
          "checked against Content-Range. Returns a RangeResult; raises InvalidArgument for a "
          "target or header that cannot be sent, BufferError for a read-only buffer.")
      .def(
          "get_document",
          [](RangeClient& client, const std::string& target, const HeaderList& headers,
             size_t max_bytes) {
            std::string document;
            RangeResult result;
            {
              BlockingCall blocking;
              result = client.get_document(target, headers, max_bytes, &document);
            }
            return py::make_tuple(std::move(result), py::bytes(document));
          },
          py::arg("target"), py::arg("headers"), py::arg("max_bytes"),
          "GET `target` with `headers` for a small document (a container's listing): "
          "(RangeResult, its 2xx body as bytes, empty for any other outcome). A body over "
          "max_bytes is MALFORMED. Raises as get_into() does.")
      .def("close", &RangeClient::close, py::call_guard<BlockingCall>(),
           "Break the requests in flight (each returns CANCELLED) and close the idle "
           "connections; later requests return CANCELLED too.")
      .def_property_readonly("host", [](const RangeClient& c) { return c.target().host; })
      .def_property_readonly("port", [](const RangeClient& c) { return c.target().port; })
      .def_property_readonly("tls", [](const RangeClient& c) { return c.target().tls; })
      .def_property_readonly("connections_opened", &RangeClient::connections_opened)
      .def_property_readonly("requests", &RangeClient::requests)
      .def_property_readonly("idle_connections", &RangeClient::idle_connections)
      .def_property_readonly("tls_library", &RangeClient::tls_library);
}
