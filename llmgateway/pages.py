"""The web pages for end users: log in, and the chat page's stream (the page itself and its
conversations are `llmgateway.chat_views`).

The page views are synchronous so django-ratelimit (sync only) guards them per IP and per user;
the chat page's own stream endpoint is async and goes through the same pipeline, limits and
billing as the API, authenticated by the session instead of an API key.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.decorators import method_decorator
from django.views.decorators.csrf import csrf_protect
from django_ratelimit.decorators import ratelimit

from llmgateway.api import serve_call
from llmgateway.auth import aprincipal_for_session
from llmgateway.errors import RateLimited, error_response
from streaming.validation import validate_chat_body

RATE_LIMITED = "Too many requests to this page. Wait a minute and try again."


def ratelimited(request: HttpRequest, exception: Exception) -> HttpResponse:
    """django-ratelimit's RATELIMIT_VIEW: a 429 with Retry-After."""
    response = error_response(RateLimited(RATE_LIMITED, headers={"Retry-After": "60"}))
    return response


@method_decorator(ratelimit(key="ip", rate=lambda group, request: settings.LOGIN_RATE, method="POST", block=True), name="post")
@method_decorator(
    ratelimit(key="post:username", rate=lambda group, request: settings.LOGIN_RATE, method="POST", block=True),
    name="post",
)
class LoginView(auth_views.LoginView):
    template_name = "registration/login.html"


@csrf_protect
async def chat_stream(request: HttpRequest) -> HttpResponseBase:
    """The chat page's streaming endpoint: OpenAI's request and SSE shapes, session-authenticated."""
    return await serve_call(request, lambda: aprincipal_for_session(request), validate_chat_body)
