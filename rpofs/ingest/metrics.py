"""An optional Prometheus endpoint: GET anything, get the text exposition."""

import logging

import trio

from ..errors import RpofsError
from .config import check_metrics_address

log = logging.getLogger(__name__)


async def serve(address: str, render, task_status=trio.TASK_STATUS_IGNORED) -> None:
    host, port = check_metrics_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as e:
        raise RpofsError(f"metrics: cannot listen on {address}: {e.strerror or e}") from None
    task_status.started()
    log.info("event=metrics-listening address=%s", address)

    async def answer(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    request += data
                body = render().encode()
                await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except trio.BrokenResourceError:
            pass  # the scraper went away
        finally:
            await stream.aclose()

    await trio.serve_listeners(answer, listeners)
