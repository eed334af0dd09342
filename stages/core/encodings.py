"""Which text encoding an input file is in: UTF-8, with or without a byte-order mark, or refused.

Windows tools write UTF-8 with a byte-order mark, which would make a file's first JSON record invalid;
UTF-16 and UTF-32 text read as UTF-8 would be noise. Every stage that reads text files starts here.
"""

from __future__ import annotations

from stages.core.errors import UserError

UTF8_BOM = b"\xef\xbb\xbf"
OTHER_ENCODINGS = {  # byte-order marks of encodings that are not UTF-8 (UTF-32's first: FF FE 00 00)
    b"\xff\xfe\x00\x00": "UTF-32 (little-endian)",
    b"\x00\x00\xfe\xff": "UTF-32 (big-endian)",
    b"\xff\xfe": "UTF-16 (little-endian)",
    b"\xfe\xff": "UTF-16 (big-endian)",
}


def without_bom(uri: str, start: bytes) -> bytes:
    """A file's first bytes without a UTF-8 byte-order mark; a file in another Unicode encoding is
    refused, naming it."""
    if start.startswith(UTF8_BOM):
        return start[len(UTF8_BOM) :]
    encoding = next((name for mark, name in OTHER_ENCODINGS.items() if start.startswith(mark)), None)
    sample = start[:4096]
    if encoding is None and len(sample) >= 16 and sample.count(0) >= 0.4 * len(sample):
        encoding = "UTF-16 or UTF-32 (no byte-order mark, but every other byte is zero)"
    if encoding:
        raise UserError(f"{uri} is {encoding} text; convert it to UTF-8 (for example: iconv -t UTF-8)")
    return start
