"""`infra.sockets.shut_down_now`: the peer gets the end of the connection in the same step, on
asyncio's and uvloop's transports alike (a transport's `close()` waits for the loop's next pass),
and a connection already gone is no error."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from infra.sockets import shut_down_now

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def run_on(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    LOOPS[loop](scenario())


async def connected() -> tuple[asyncio.Transport, socket.socket, socket.socket]:
    """A client transport on this loop, and the server side of its connection (a blocking
    socket, read without the loop)."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, *listening.getsockname())
    server_side, _ = listening.accept()
    server_side.settimeout(0)  # never wait: what it reads must be there already
    return transport, server_side, listening


@pytest.mark.parametrize("loop", LOOPS)
def test_the_peer_reads_the_end_of_the_connection_before_the_loop_runs_again(loop: str) -> None:
    async def scenario() -> None:
        transport, server_side, listening = await connected()
        with server_side, listening:
            transport.close()
            with pytest.raises(BlockingIOError):  # close() alone: nothing sent yet
                server_side.recv(1)
            shut_down_now(transport)
            assert server_side.recv(1) == b""  # the FIN, in this same step

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_closed_transport_never_cuts_the_connection_that_took_its_descriptor_number(loop: str) -> None:
    async def scenario() -> None:
        transport, server_side, listening = await connected()
        number = transport.get_extra_info("socket").fileno()
        with server_side, listening:
            transport.close()
            for _ in range(3):
                await asyncio.sleep(0)  # its socket is closed now, and its number free
            other = socket.create_connection(listening.getsockname())
            other_server_side, _ = listening.accept()
            with other, other_server_side:
                assert number in (other.fileno(), other_server_side.fileno())  # the kernel reused it
                other_server_side.settimeout(0)
                other.settimeout(0)
                shut_down_now(transport)
                for end in (other, other_server_side):
                    with pytest.raises(BlockingIOError):  # nothing to read, and no end either
                        end.recv(1)

    run_on(loop, scenario)
