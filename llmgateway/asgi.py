"""ASGI entry point: `llmgateway.asgi:application` (serve with Granian; see README).

The API (`/v1/...`) and the probes go to a handler with only async middleware: they authenticate
by API key, so session, CSRF and auth middleware (each a thread hop per request on the async
path) would be pure overhead on the hot path. Everything else (admin, chat page, metrics) goes
through Django's full middleware stack.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmgateway.settings")
django_asgi_app = get_asgi_application()

import asyncio  # noqa: E402
from contextlib import closing  # noqa: E402

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402
from django.urls import set_script_prefix  # noqa: E402

from llmgateway.lifespan import lifespan  # noqa: E402
from llmgateway.middleware import RequestTimingMiddleware  # noqa: E402

LEAN_PATH_PREFIXES = ("/v1/", "/healthz", "/readyz")


class _RequestProcessed(Exception):
    """Ends the disconnect listener's task group once the response is sent (as Django does)."""


class LeanASGIHandler(ASGIHandler):
    """An ASGIHandler whose middleware chain is a fixed list of async middleware.

    It also runs requests outside a per-request `ThreadSensitiveContext`: that context gives
    each request a thread of its own for its sync calls, and a stream would hold that thread
    (and its stack) for its whole life. The API's database work runs in the shared worker
    threads (`llmgateway.db.db_task`), which look after their own connections.

    `handle` is Django's own (6.1) without its two hops to a thread per request: it does not
    send `request_started` (Django's receivers reset this thread's query log and close its stale
    connections; this thread has none), and it closes the response on the event loop, where
    `request_finished` fires synchronously (same reason). Measured: 8% less CPU per short call,
    0.25 ms off the time to first token.
    """

    middleware = (RequestTimingMiddleware,)

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):  # type: ignore[no-untyped-def]
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        with closing(body_file):
            set_script_prefix(get_script_prefix(scope))
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                await self.send_response(error_response, send)
                error_response.close()
                return
            response = None
            try:
                try:
                    async with asyncio.TaskGroup() as tasks:
                        tasks.create_task(self.listen_for_disconnect(receive))
                        response = await self.run_get_response(request)
                        await self.send_response(response, send)
                        raise _RequestProcessed
                except* (_RequestProcessed, RequestAborted):
                    pass
            except BaseExceptionGroup as exception_group:
                if len(exception_group.exceptions) == 1:
                    raise exception_group.exceptions[0]  # noqa: B904 - Django re-raises it the same way
                raise
            if response is not None:
                response.close()

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        handler = convert_exception_to_response(self._get_response_async)
        for middleware in reversed(self.middleware):
            handler = convert_exception_to_response(middleware(handler))
        self._middleware_chain = handler


lean_asgi_app = LeanASGIHandler()


async def http_app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["path"].startswith(LEAN_PATH_PREFIXES):
        return await lean_asgi_app(scope, receive, send)
    return await django_asgi_app(scope, receive, send)


application = ProtocolTypeRouter({"http": http_app, "lifespan": lifespan})
