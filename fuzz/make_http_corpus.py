"""Write the HTTP response fuzzer's seed corpus (fuzz/http_corpus/): answers a range reader
meets, well-formed (a 206 range, a whole 200, Azure's error answers with Content-Length and
Azurite's chunked ones, an interim 100) and each of the malformed kinds the reader refuses.
Deterministic: rerunning rewrites the same bytes.

    python fuzz/make_http_corpus.py
"""

from __future__ import annotations

from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "http_corpus"


def answer(status: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode() + b"\r\n" + body


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


ERROR_XML = (
    b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ConditionNotMet</Code>'
    b"<Message>The condition specified using HTTP conditional header(s) is not met.</Message>"
    b"</Error>"
)
BLOB_HEADERS = [
    ("Content-Length", "16"),
    ("Content-Type", "application/octet-stream"),
    ("Content-Range", "bytes 10-25/4096"),
    ("ETag", '"0x8DC0123456789AB"'),
    ("Server", "Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0"),
    ("x-ms-request-id", "2f1c7f0e-a01e-0062-3f8b-1c6b5a000000"),
    ("x-ms-version", "2021-08-06"),
    ("x-ms-blob-type", "BlockBlob"),
    ("Accept-Ranges", "bytes"),
    ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
]

SEEDS = {
    "ok_206_range": answer("206 Partial Content", BLOB_HEADERS, bytes(range(16))),
    "ok_200_whole": answer("200 OK", [("Content-Length", "4"), ("ETag", '"x"')], b"abcd"),
    "ok_206_no_reason": (
        b"HTTP/1.1 206\r\nContent-Length: 2\r\nContent-Range: bytes 0-1/2\r\n\r\nab"
    ),
    "ok_http10_close": answer(
        "206 OK", [("Content-Length", "1"), ("Content-Range", "bytes 0-0/*")]
    ).replace(b"HTTP/1.1", b"HTTP/1.0")
    + b"x",
    "ok_interim_100": b"HTTP/1.1 100 Continue\r\n\r\n"
    + answer("206 OK", [("Content-Length", "1"), ("Content-Range", "bytes 5-5/9")], b"z"),
    "error_412_length": answer(
        "412 The condition specified using HTTP conditional header(s) is not met.",
        [
            ("Content-Length", str(len(ERROR_XML))),
            ("Content-Type", "application/xml"),
            ("x-ms-error-code", "ConditionNotMet"),
        ],
        ERROR_XML,
    ),
    "error_412_chunked": answer(
        "412 Precondition Failed",
        [("Transfer-Encoding", "chunked"), ("x-ms-error-code", "ConditionNotMet")],
        chunked(ERROR_XML),
    ),
    "error_503_retry_after": answer(
        "503 Egress is over the account limit.",
        [("Content-Length", "0"), ("Retry-After", "2"), ("x-ms-error-code", "ServerBusy")],
    ),
    "error_chunked_ext_trailer": answer(
        "500 Internal Server Error",
        [("Transfer-Encoding", "gzip, chunked"), ("Connection", "close")],
        b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: yes\r\n\r\n",
    ),
    "bad_bare_lf": b"HTTP/1.1 206 OK\nContent-Length: 1\n\nx",
    "bad_folded": b"HTTP/1.1 206 OK\r\nX-A: 1\r\n  continued\r\n\r\n",
    "bad_space_before_colon": b"HTTP/1.1 206 OK\r\nContent-Length : 1\r\n\r\nx",
    "bad_lengths_disagree": b"HTTP/1.1 206 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    "bad_length_and_chunked": answer(
        "206 OK",
        [("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
        b"1\r\nx\r\n0\r\n\r\n",
    ),
    "bad_content_range": answer(
        "206 OK", [("Content-Length", "2"), ("Content-Range", "bytes 9-3/2")]
    ),
    "bad_status": b"HTTP/1.1 2x6 OK\r\n\r\n",
    "bad_version": b"HTTP/2.0 206 OK\r\n\r\n",
    "bad_chunk_size": answer("404 Not Found", [("Transfer-Encoding", "chunked")], b"zz\r\nx\r\n"),
    "truncated_head": b"HTTP/1.1 206 Partial Content\r\nContent-Length: 16\r\nContent-Ra",
}


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for name, data in SEEDS.items():
        (CORPUS / f"{name}.http").write_bytes(data)
    print(f"wrote {len(SEEDS)} seeds to {CORPUS}")


if __name__ == "__main__":
    main()
