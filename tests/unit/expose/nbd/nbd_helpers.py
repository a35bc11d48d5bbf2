"""Client-side NBD byte builders for tests, written from the spec independently
of the server's encoder so the two check each other."""

from __future__ import annotations

import asyncio
import contextlib
import struct

IHAVEOPT = b"IHAVEOPT"
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_REPLY_MAGIC = 0x3E889045565A9


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def go_payload(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def request(
    command: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, handle, offset, length) + data


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPT_REPLY_MAGIC
        pos += 20
        out.append((opt, rtype, data[pos : pos + length]))
        pos += length
    return out


class RawClient:
    """A minimal NBD client over asyncio streams, for bad-input tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def greeting(self, client_flags: int = 3) -> int:
        head = await self.reader.readexactly(18)
        assert head[:16] == b"NBDMAGIC" + IHAVEOPT
        self.writer.write(struct.pack(">I", client_flags))
        return int(struct.unpack(">H", head[16:])[0])

    async def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", await self.reader.readexactly(20))
        assert magic == OPT_REPLY_MAGIC
        return opt, rtype, await self.reader.readexactly(length)

    async def go(self, name: str, structured: bool = False) -> tuple[int, int]:
        """Handshake into transmission on export ``name``; return (size, flags)."""
        await self.greeting()
        if structured:
            self.writer.write(option(8))
            assert (await self.option_reply())[1] == 1
        self.writer.write(option(7, go_payload(name)))
        size = flags = -1
        while True:
            _, rtype, payload = await self.option_reply()
            if rtype == 1:
                return size, flags
            assert rtype == 3, f"unexpected reply {rtype:#x}: {payload!r}"
            if struct.unpack_from(">H", payload)[0] == 0:
                _, size, flags = struct.unpack(">HQH", payload)

    async def simple_reply(self) -> tuple[int, int]:
        magic, error, handle = struct.unpack(">IIQ", await self.reader.readexactly(16))
        assert magic == SIMPLE_MAGIC
        return error, handle

    async def read(self, handle: int, offset: int, length: int) -> tuple[int, bytes]:
        """A READ without structured replies: (error, data)."""
        self.writer.write(request(0, handle, offset, length))
        error, got = await self.simple_reply()
        assert got == handle
        return error, (b"" if error else await self.reader.readexactly(length))

    async def write(self, handle: int, offset: int, data: bytes, flags: int = 0) -> int:
        self.writer.write(request(1, handle, offset, len(data), flags, data))
        error, got = await self.simple_reply()
        assert got == handle
        return error

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
