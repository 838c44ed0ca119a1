"""What a turn sends the model: the system prompt and as much of the conversation as fits.

A conversation can outgrow its model's context window. The newest messages are kept and the
oldest left out, whole, until the prompt plus room for the reply fits; the system prompt and the
newest message are always sent (if they alone do not fit, the turn is refused). Tokens are counted
with the gateway's own counter (`streaming.tokens`), the one its admission and billing use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from django.conf import settings

from chat.exceptions import ContextTooLong
from streaming.catalog import ModelRoute
from streaming.tokens import count_chat_prompt_tokens

TOO_LONG = (
    "This message is too long for {model}: with the system prompt it is {tokens:,} tokens, and "
    "{model} takes {budget:,} (its context window of {window:,} less {reply:,} kept for the answer)."
)

ChatMessage = dict[str, str]


@dataclass(frozen=True, slots=True)
class Context:
    messages: list[ChatMessage]
    prompt_tokens: int  # as the gateway counts them
    left_out: int  # earlier messages not sent


def reply_allowance(route: ModelRoute) -> int:
    """Tokens kept free for the answer: what the gateway reserves for a call with no max_tokens,
    at most half the window."""
    return min(settings.GATEWAY_DEFAULT_MAX_TOKENS, route.context_window // 2)


def fit_context(*, system_prompt: str, history: Sequence[ChatMessage], route: ModelRoute) -> Context:
    """The newest messages of `history` (oldest first) that fit `route`'s window with the system
    prompt and the reply's allowance; raise ContextTooLong if the newest alone does not."""
    return fit_newest(system_prompt=system_prompt, newest_first=reversed(history), total=len(history), route=route)


def fit_newest(*, system_prompt: str, newest_first: Iterable[ChatMessage], total: int, route: ModelRoute) -> Context:
    """`fit_context` of a history given newest first (`total` messages in all), read only until
    the window is full: a long conversation's older messages are never loaded."""
    model = route.upstream_model
    reply = reply_allowance(route)
    budget = route.context_window - reply
    # count_chat_prompt_tokens counts each message on its own plus a fixed priming of the reply,
    # so a prompt's tokens are the priming plus each message's own.
    priming = count_chat_prompt_tokens([], model=model)

    def own_tokens(message: ChatMessage) -> int:
        return count_chat_prompt_tokens([message], model=model) - priming

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    used = priming + sum(own_tokens(message) for message in system)
    kept: list[ChatMessage] = []
    for message in newest_first:
        tokens = own_tokens(message)
        if used + tokens > budget:
            if not kept:
                raise ContextTooLong(
                    TOO_LONG.format(model=route.id, tokens=used + tokens, budget=budget, window=route.context_window, reply=reply)
                )
            break
        used += tokens
        kept.append(message)
    kept.reverse()
    return Context(messages=system + kept, prompt_tokens=used, left_out=total - len(kept))
