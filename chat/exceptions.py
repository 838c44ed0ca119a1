"""Why a chat-page request was refused, in the chat's terms; the page's views map each to a 4xx.

    ChatError
    ├── ConversationNotFound   no such conversation, or another user's
    ├── InvalidTurn            the input does not make a turn (empty, too long, bad model or state)
    └── ContextTooLong         the newest message alone does not fit the model's context window
"""

from __future__ import annotations

NOT_FOUND = "This conversation does not exist, or it is not yours."


class ChatError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConversationNotFound(ChatError):
    pass


class InvalidTurn(ChatError):
    pass


class ContextTooLong(ChatError):
    pass
