from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path, re_path
from django.views.generic import RedirectView

from llmgateway import api, chat_views, logins, ops, pages, portal

urlpatterns = [
    path("v1/chat/completions", api.chat_completions, name="chat-completions"),
    path("v1/responses", api.responses, name="responses"),
    path("v1/responses/<str:response_id>", api.stored_response, name="stored-response"),
    path("v1/responses/<str:response_id>/cancel", api.stored_response_cancel, name="stored-response-cancel"),
    path("v1/completions", api.completions, name="completions"),
    path("v1/embeddings", api.embeddings, name="embeddings"),
    path("v1/models", api.models_list, name="models"),
    path("v1/openapi.json", api.openapi_document, name="openapi"),
    # [\s\S], not `.` or a path converter: a path with an encoded newline is still the API's.
    re_path(r"^v1/models/(?P<model>[\s\S]+)$", api.model_detail, name="model-detail"),
    re_path(r"^v1/(?P<path>[\s\S]*)$", api.unknown_endpoint),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
    path("", RedirectView.as_view(url="/chat/", permanent=False)),
    path("favicon.ico", chat_views.favicon, name="favicon"),
    path("chat/", chat_views.chat_page, name="chat"),
    path("chat/c/<uuid:conversation_id>/", chat_views.chat_page, name="chat-conversation"),
    path("chat/completions", pages.chat_stream, name="chat-stream"),
    path("chat/api/conversations", chat_views.conversations, name="chat-conversations"),
    path("chat/api/conversations/<uuid:conversation_id>", chat_views.conversation, name="chat-conversation-api"),
    path("chat/api/conversations/<uuid:conversation_id>/answers", chat_views.answers, name="chat-answers"),
    path("chat/api/turns", chat_views.turns, name="chat-turns"),
    path("chat/api/spend", chat_views.spend, name="chat-spend"),
    path("accounts/login/", pages.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/password/", logins.PasswordChangeView.as_view(), name="password_change"),
    path("accounts/password/done/", logins.PasswordChangeDoneView.as_view(), name="password_change_done"),
    path("accounts/set-password/<uidb64>/<token>/", logins.PasswordSetView.as_view(), name="password_set"),
    path("accounts/set-password/done/", logins.PasswordSetDoneView.as_view(), name="password_set_done"),
    path("account/", portal.account_page, name="account"),
    path("account/keys/", portal.key_create, name="account-key-create"),
    path("account/keys/<int:key_id>/revoke", portal.key_revoke, name="account-key-revoke"),
    path("account/keys/<int:key_id>/rename", portal.key_rename, name="account-key-rename"),
    path("admin/", admin.site.urls),
]
