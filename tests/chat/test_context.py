"""What a turn sends the model: as much of the conversation as fits its context window."""

from __future__ import annotations

import pytest
from django.test import override_settings

from chat.context import fit_context, reply_allowance
from chat.exceptions import ContextTooLong
from streaming.catalog import ModelRoute, ProviderSpec, single_route
from streaming.tokens import count_chat_prompt_tokens

OPENAI = ProviderSpec(name="openai", kind="openai", base_url="https://api.openai.com/v1")
GPT = single_route(id="gpt-4o-mini", provider=OPENAI)


def route(window: int) -> ModelRoute:
    return single_route(id="small", provider=OPENAI, upstream_model="gpt-4o-mini", context_window=window)


def turns(count: int, words: int = 50) -> list[dict[str, str]]:
    return [
        {"role": "user" if index % 2 == 0 else "assistant", "content": f"message {index}: " + "word " * words}
        for index in range(count)
    ]


def test_a_conversation_that_fits_is_sent_whole_after_the_system_prompt() -> None:
    history = turns(5)
    context = fit_context(system_prompt="Be brief.", history=history, route=GPT)
    assert context.messages == [{"role": "system", "content": "Be brief."}, *history]
    assert context.left_out == 0
    assert context.prompt_tokens == count_chat_prompt_tokens(context.messages, model="gpt-4o-mini")


def test_no_system_message_is_sent_without_a_system_prompt() -> None:
    context = fit_context(system_prompt="", history=turns(1), route=GPT)
    assert [message["role"] for message in context.messages] == ["user"]


@override_settings(GATEWAY_DEFAULT_MAX_TOKENS=100)
def test_the_oldest_messages_are_left_out_until_the_prompt_and_the_reply_fit_the_window() -> None:
    history = turns(20)
    one = count_chat_prompt_tokens([history[0]], model="gpt-4o-mini") - count_chat_prompt_tokens([], model="gpt-4o-mini")
    small = route(100 + 3 + 4 * one + one // 2)  # room for four and a half messages after the reply's 100
    context = fit_context(system_prompt="", history=history, route=small)
    assert context.messages == history[-4:]
    assert context.left_out == 16
    assert context.prompt_tokens == count_chat_prompt_tokens(context.messages, model="gpt-4o-mini")
    assert context.prompt_tokens + reply_allowance(small) <= small.context_window


@override_settings(GATEWAY_DEFAULT_MAX_TOKENS=100)
def test_the_system_prompt_is_always_sent_and_takes_its_room_first() -> None:
    history = turns(10)
    system = "Answer like a pirate. " * 20
    with_system = fit_context(system_prompt=system, history=history, route=route(700))
    without = fit_context(system_prompt="", history=history, route=route(700))
    assert with_system.messages[0] == {"role": "system", "content": system}
    assert len(with_system.messages) - 1 < len(without.messages)
    assert with_system.messages[-1] == history[-1]


@override_settings(GATEWAY_DEFAULT_MAX_TOKENS=100)
def test_a_newest_message_too_long_for_the_model_is_refused_in_plain_words() -> None:
    with pytest.raises(ContextTooLong, match=r"This message is too long for small: with the system prompt it is [\d,]+ tokens, and small takes 150"):
        fit_context(system_prompt="", history=turns(1, words=400), route=route(250))


@override_settings(GATEWAY_DEFAULT_MAX_TOKENS=4096)
def test_the_reply_keeps_the_gateways_default_completion_room_but_at_most_half_a_small_window() -> None:
    assert reply_allowance(GPT) == 4096
    assert reply_allowance(route(2_000)) == 1_000
