"""Backpressure shared by the sandboxer's two socket protocols (gRPC over HTTP/2, and ttrpc)."""

from __future__ import annotations

import asyncio


class ReadPausingProtocol(asyncio.Protocol):
    """A server connection that reads no more requests while its answers cannot be written."""

    transport: asyncio.Transport | None

    def pause_writing(self) -> None:
        if self.transport is not None:  # a peer that does not read its answers sends no more requests
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()
