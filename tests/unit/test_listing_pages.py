"""A page of List Blobs, as the core hands it back (the service's XML), read into ListedBlobs:
names the service percent-encoded, folders, Content-MD5, the Archive tier, the next page's
marker; a page that is not the service's listing is a transient ConnectionError (cut or garbled
on its way), never a listing of fewer blobs."""

from __future__ import annotations

import base64

import pytest
from blob2gpu.sources.azure.listing import ListedBlob, parse_list_page

MD5 = bytes(range(16))


def page(entries: str, next_marker: str = "") -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?><EnumerationResults ContainerName="c">'
        f"<Prefix>m/</Prefix><Delimiter>/</Delimiter><Blobs>{entries}</Blobs>"
        f"<NextMarker>{next_marker}</NextMarker></EnumerationResults>"
    ).encode()


def blob(name: str, size: int = 10, extra: str = "", encoded: bool = False) -> str:
    attribute = ' Encoded="true"' if encoded else ""
    return (
        f"<Blob><Name{attribute}>{name}</Name><Properties><Etag>0x8DC1</Etag>"
        f"<Content-Length>{size}</Content-Length><BlobType>BlockBlob</BlobType>{extra}"
        "</Properties></Blob>"
    )


def parse(data: bytes) -> tuple[list[ListedBlob], set[str], str | None]:
    blobs: list[ListedBlob] = []
    folders: set[str] = set()
    marker = parse_list_page(data, blobs, folders)
    return blobs, folders, marker


def test_blobs_folders_and_the_next_marker():
    md5 = f"<Content-MD5>{base64.b64encode(MD5).decode()}</Content-MD5>"
    blobs, folders, marker = parse(
        page(
            blob("m/a.safetensors", 123, md5 + "<AccessTier>Hot</AccessTier>")
            + "<BlobPrefix><Name>m/tokenizer/</Name></BlobPrefix>"
            + blob("m/config &amp; more.json", 5),
            next_marker="2!72!MDAwMDQ2",
        )
    )
    assert blobs == [
        ListedBlob("m/a.safetensors", 123, "0x8DC1", MD5, None),
        ListedBlob("m/config & more.json", 5, "0x8DC1", None, None),
    ]
    assert folders == {"m/tokenizer"}
    assert marker == "2!72!MDAwMDQ2"
    assert parse(page(""))[2] is None  # the last page


def test_a_name_the_service_encoded_is_decoded():
    blobs, _, _ = parse(page(blob("m/odd%EF%BF%BEname.json", encoded=True)))
    assert blobs[0].name == "m/odd\ufffename.json"


def test_the_archive_tier_and_a_rehydration_say_why_the_bytes_are_refused():
    archived = blob("m/a", extra="<AccessTier>Archive</AccessTier>")
    rehydrating = blob(
        "m/b",
        extra="<AccessTier>Archive</AccessTier><ArchiveStatus>rehydrate-pending-to-hot"
        "</ArchiveStatus>",
    )
    blobs, _, _ = parse(page(archived + rehydrating))
    assert [b.archived for b in blobs] == [
        "in the Archive tier",
        "being rehydrated (rehydrate-pending-to-hot)",
    ]


def test_a_content_md5_that_is_not_sixteen_bytes_of_base64_is_no_checksum():
    for value in ("not base64!", base64.b64encode(b"short").decode()):
        blobs, _, _ = parse(page(blob("m/a", extra=f"<Content-MD5>{value}</Content-MD5>")))
        assert blobs[0].content_md5 is None


BROKEN_PAGES = {
    "not-xml": b"<EnumerationResults><Blobs>",
    "html": b"<html><body>Gateway timeout</body></html>",
    "another-document": b"<Error><Code>x</Code></Error>",
    "no-blobs": b"<EnumerationResults></EnumerationResults>",
    "nameless-blob": page("<Blob><Properties><Etag>1</Etag></Properties></Blob>"),
    "blob-without-size": page(
        "<Blob><Name>m/a</Name><Properties><Etag>1</Etag></Properties></Blob>"
    ),
    "blob-without-etag": page(
        "<Blob><Name>m/a</Name><Properties><Content-Length>1</Content-Length></Properties></Blob>"
    ),
    "negative-size": page(blob("m/a", -1)),
}


@pytest.mark.parametrize("data", BROKEN_PAGES.values(), ids=BROKEN_PAGES)
def test_a_page_that_is_not_the_services_listing_is_a_transient_failure(data):
    with pytest.raises(ConnectionError, match="listing"):
        parse(data)


def test_entity_expansion_is_refused():
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        b"<EnumerationResults><Blobs>" + blob("m/&b;").encode() + b"</Blobs></EnumerationResults>"
    )
    with pytest.raises(ConnectionError, match="listing"):
        parse(bomb)
