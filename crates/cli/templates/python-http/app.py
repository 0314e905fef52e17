"""{{name}}: a Mayfly function in Python.

GET answers with a greeting (the GREETING environment variable, "Hello" if
unset); POST answers with the request's body; other methods get 405.
"""

from wit_world import exports
from wit_world.imports import environment
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Get,
    Method_Post,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)
from componentize_py_types import Err, Ok

FUNCTION = "{{name}}"


def greeting() -> str:
    # Read per request, not at import: componentize-py snapshots the module
    # state at build time, so a value read then would be the build
    # machine's, not the one the function is deployed with.
    return dict(environment.get_environment()).get("GREETING", "Hello")


def read_body(request: IncomingRequest) -> bytes:
    chunks = []
    body = request.consume()
    # The stream must be dropped (the `with` ends it) before its body is.
    with body.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(64 * 1024))
            except Err as error:
                if isinstance(error.value, StreamError_Closed):
                    break
                raise
    return b"".join(chunks)


def respond(response_out: ResponseOutparam, status: int, body: bytes, content_type: str) -> None:
    headers = Fields.from_list([("content-type", content_type.encode())])
    response = OutgoingResponse(headers)
    response.set_status_code(status)
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    # The stream must be dropped (the `with` ends it) before the body is
    # finished; blocking_write_and_flush takes at most 4096 bytes a call.
    with outgoing.write() as stream:
        for start in range(0, len(body), 4096):
            stream.blocking_write_and_flush(body[start : start + 4096])
    OutgoingBody.finish(outgoing, None)


class IncomingHandler(exports.IncomingHandler):
    """Mayfly calls `handle` once per request, in a fresh instance."""

    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        method = request.method()
        if isinstance(method, Method_Get):
            text = f"{greeting()} from {FUNCTION}!\n"
            respond(response_out, 200, text.encode(), "text/plain; charset=utf-8")
        elif isinstance(method, Method_Post):
            respond(response_out, 200, read_body(request), "application/octet-stream")
        else:
            respond(response_out, 405, b"use GET or POST\n", "text/plain; charset=utf-8")
