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

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402

from llmgateway.lifespan import lifespan  # noqa: E402
from llmgateway.middleware import RequestTimingMiddleware  # noqa: E402

LEAN_PATH_PREFIXES = ("/v1/", "/healthz", "/readyz")


class LeanASGIHandler(ASGIHandler):
    """An ASGIHandler whose middleware chain is a fixed list of async middleware.

    It also runs requests outside a per-request `ThreadSensitiveContext`: that context gives
    each request a thread of its own for its sync calls, and a stream would hold that thread
    (and its stack) for its whole life. The API's database work runs in the shared worker
    threads (`llmgateway.db.db_task`); Django's own sync signal receivers run in asgiref's one
    shared thread.
    """

    middleware = (RequestTimingMiddleware,)

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

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
