"""Length-prefixed messages over an asyncio stream: u32 length | u8 kind | body.

Every read has a deadline and a size cap checked before the body is read; nothing is ever
unpickled: bodies are raw payload bytes or msgspec-encoded structs.
"""

from __future__ import annotations

import asyncio
import struct
from enum import IntEnum

from ..errors import SpectrumKVError

_HEAD = struct.Struct("<IB")
MAX_MESSAGE_BYTES = 1 << 30


class Kind(IntEnum):
    CHALLENGE = 1
    AUTH = 2
    AUTH_OK = 3
    REQUEST = 4
    HEADER = 5
    FRAME = 6
    DONE = 7
    ERROR = 8


class TransportError(SpectrumKVError):
    """The peer went away, sent garbage, or missed a deadline."""


class PeerTimeout(TransportError):
    """A deadline passed while waiting for the peer."""


async def send_msg(
    writer: asyncio.StreamWriter, kind: Kind, body: bytes | bytearray | memoryview
) -> None:
    """Queue one message (head and body written separately: the body is not copied into a
    joined buffer) and wait for the transport to drain. Raises TransportError if the peer left."""
    try:
        writer.write(_HEAD.pack(len(body), int(kind)))
        writer.write(body)
        await writer.drain()
    except (ConnectionError, OSError) as e:
        raise TransportError(f"peer closed the connection: {type(e).__name__}") from None


async def recv_msg(
    reader: asyncio.StreamReader, timeout: float, max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[Kind, bytes]:
    """Read one message within `timeout` seconds. Raises PeerTimeout / TransportError."""
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readexactly(_HEAD.size)
            length, kind = _HEAD.unpack(head)
            if length > max_bytes:
                raise TransportError(f"peer announced a {length}-byte message (limit {max_bytes})")
            try:
                k = Kind(kind)
            except ValueError:
                raise TransportError(f"unknown message kind {kind}") from None
            return k, await reader.readexactly(length)
    except TimeoutError:
        raise PeerTimeout(f"no message from peer within {timeout:.1f} s") from None
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise TransportError(f"peer closed the connection: {type(e).__name__}") from None
