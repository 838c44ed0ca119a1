"""Conversations saved per user: turns, answers, what an answer cost, and the user's spend."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing.models import AccountPrice, PlanPrice, PricingPlan, UsageRecord
from billing.selectors import rates_for
from billing.services import account_get_or_create, account_quota_set, usage_record_create
from chat import selectors, services
from chat.exceptions import ContextTooLong, ConversationNotFound, InvalidTurn
from chat.models import Conversation, Message
from upstreams.catalog import available_routes

pytestmark = pytest.mark.django_db

MODEL = "sim-chat"  # the simulator: served without an upstream key, priced $1 / $2 per 1M tokens


@pytest.fixture
def alice() -> Any:
    return get_user_model().objects.create_user(username="alice")


@pytest.fixture
def bob() -> Any:
    return get_user_model().objects.create_user(username="bob")


def send(user: Any, content: str, conversation: Conversation | None = None, **settings: Any) -> services.Turn:
    return services.turn_begin(
        user_id=user.pk, conversation_id=conversation.pk if conversation else None, mode="send", content=content,
        model=settings.pop("model", MODEL), **settings,
    )


def answer(user: Any, conversation: Conversation, content: str, state: str = "complete", **fields: Any) -> Message:
    return services.answer_record(user_id=user.pk, conversation_id=conversation.pk, content=content, state=state, **fields)


def ledger_row(user: Any, *, prompt: int = 120, completion: int = 30, status: str = "completed") -> UsageRecord:
    now = timezone.now()
    rates = rates_for(account=account_get_or_create(user_id=user.pk), model=MODEL, at=now)
    assert rates is not None
    return usage_record_create(
        request_id=uuid.uuid4(), user_id=user.pk, api_key_id=None, model=MODEL, upstream_model=MODEL, provider="openai",
        stream=True, status=status, error_kind="", prompt_tokens=prompt, completion_tokens=completion, cached_tokens=0,
        reasoning_tokens=0, token_source="upstream", ttft_us=250_000, duration_us=900_000, created_at=now, rates=rates,
    )


# --- Turns --------------------------------------------------------------------------------------


def test_a_first_message_starts_a_conversation_titled_from_it_on_one_line(alice) -> None:
    turn = send(alice, "  How do I\n  bake bread?  ")
    assert turn.conversation.title == "How do I bake bread?"
    assert turn.conversation.user == alice and turn.conversation.model == MODEL
    assert turn.context.messages == [{"role": "user", "content": "  How do I\n  bake bread?  "}]


def test_a_long_first_message_gives_a_title_cut_at_a_word_with_an_ellipsis() -> None:
    title = services.title_from("word " * 40)
    assert len(title) <= 80 and title.endswith("word…")


def test_continuing_sends_the_earlier_messages_and_answers_in_order_with_the_system_prompt(alice) -> None:
    first = send(alice, "My name is Alice.")
    answer(alice, first.conversation, "Hello Alice!")
    second = send(alice, "What is my name?", first.conversation, system_prompt="Be brief.", temperature=Decimal("0.5"))
    assert second.context.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Alice."},
        {"role": "assistant", "content": "Hello Alice!"},
        {"role": "user", "content": "What is my name?"},
    ]
    conversation = Conversation.objects.get()
    assert (conversation.system_prompt, conversation.temperature) == ("Be brief.", Decimal("0.5"))


def test_an_answer_that_failed_before_any_text_is_not_sent_as_context(alice) -> None:
    first = send(alice, "Hello?")
    answer(alice, first.conversation, "", state="failed", error="Too many requests right now.")
    second = send(alice, "Hello again?", first.conversation)
    assert [message["content"] for message in second.context.messages] == ["Hello?", "Hello again?"]


def test_a_stopped_answer_is_kept_and_sent_as_context(alice) -> None:
    first = send(alice, "Count to ten.")
    answer(alice, first.conversation, "one two thr", state="stopped", error="Stopped.")
    second = send(alice, "Go on.", first.conversation)
    assert second.context.messages[1] == {"role": "assistant", "content": "one two thr"}


def test_regenerate_drops_the_last_answer_and_answers_the_same_message_again(alice) -> None:
    first = send(alice, "Pick a number.")
    answer(alice, first.conversation, "Seven.")
    again = services.turn_begin(user_id=alice.pk, conversation_id=first.conversation.pk, mode="regenerate", content="", model=MODEL)
    assert again.message == first.message
    assert again.context.messages == [{"role": "user", "content": "Pick a number."}]
    assert list(Message.objects.values_list("role", "content")) == [("user", "Pick a number.")]


def test_edit_replaces_the_last_message_and_its_answer(alice) -> None:
    first = send(alice, "Translate cat.")
    answer(alice, first.conversation, "Chat.")
    send(alice, "Translate dog.", first.conversation)
    answer(alice, first.conversation, "Chien.")
    edited = services.turn_begin(user_id=alice.pk, conversation_id=first.conversation.pk, mode="edit", content="Translate bird.", model=MODEL)
    assert [message["content"] for message in edited.context.messages] == ["Translate cat.", "Chat.", "Translate bird."]
    assert list(Message.objects.values_list("content", flat=True)) == ["Translate cat.", "Chat.", "Translate bird."]


def test_a_message_too_long_for_the_model_saves_nothing(alice, settings) -> None:
    settings.GATEWAY_MODELS_JSON = '{"tiny": {"provider": "simulator", "context_window": 64}}'
    from upstreams.catalog import forget

    forget()
    try:
        with pytest.raises(ContextTooLong):
            send(alice, "word " * 200, model="tiny")
    finally:
        forget()
    assert not Conversation.objects.exists() and not Message.objects.exists()


def test_a_user_keeps_at_most_the_set_number_of_conversations(alice, bob, settings) -> None:
    settings.CHAT_MAX_CONVERSATIONS = 2
    first = send(alice, "one").conversation
    send(alice, "two")
    with pytest.raises(InvalidTurn) as refused:
        send(alice, "three")
    assert refused.value.message == services.TOO_MANY_CONVERSATIONS.format(count=2)
    assert Conversation.objects.filter(user=alice).count() == 2 and not Message.objects.filter(content="three").exists()
    send(alice, "still fine", first)  # an existing conversation goes on
    send(bob, "bob's first")  # the cap is each user's
    first.delete()
    send(alice, "three")


def test_a_conversation_holds_at_most_the_set_number_of_messages_its_answers_counted(alice, settings) -> None:
    settings.CHAT_MAX_MESSAGES = 4
    conversation = send(alice, "one").conversation
    answer(alice, conversation, "1")
    send(alice, "two", conversation)
    answer(alice, conversation, "2")
    with pytest.raises(InvalidTurn) as refused:
        send(alice, "three", conversation)
    assert refused.value.message == services.CONVERSATION_FULL.format(count=4)
    assert conversation.messages.count() == 4
    edited = services.turn_begin(user_id=alice.pk, conversation_id=conversation.pk, mode="edit", content="TWO", model=MODEL)
    assert edited.message.content == "TWO"  # editing or regenerating the last message does not grow it


def test_a_turn_reads_a_long_conversation_newest_first_only_until_the_window_is_full(alice, django_assert_max_num_queries) -> None:
    conversation = send(alice, "first").conversation
    answer(alice, conversation, "ok")
    long_text = "word " * 2_000  # about 2,000 tokens: a handful fill sim-chat's window
    Message.objects.bulk_create(
        Message(conversation=conversation, role=role, content=long_text) for _ in range(100) for role in ("user", "assistant")
    )
    with CaptureQueriesContext(connection) as captured:
        turn = send(alice, "last", conversation)
    selected = [query["sql"] for query in captured.captured_queries if query["sql"].startswith("SELECT")]
    read = [sql for sql in selected if '"chat_message"."content"' in sql.split(" FROM ")[0]]  # messages' text loaded
    assert read and all("LIMIT" in sql for sql in read), read
    assert len(read) == 1  # one page of the newest messages held more than the window
    assert turn.context.messages[-1] == {"role": "user", "content": "last"}
    assert 1 <= len(turn.context.messages) - 1 < services.HISTORY_PAGE
    assert turn.context.left_out == 203 - len(turn.context.messages)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"content": "   "}, services.EMPTY_MESSAGE),
        ({"content": "x" * 100_001}, services.MESSAGE_TOO_LONG),
        ({"model": "no-such-model"}, "The model `no-such-model` is not available on this gateway."),
        ({"temperature": Decimal("2.5")}, services.BAD_TEMPERATURE),
        ({"temperature": Decimal("-0.1")}, services.BAD_TEMPERATURE),
        ({"temperature": Decimal("NaN")}, services.BAD_TEMPERATURE),
        ({"system_prompt": "x" * 10_001}, services.SYSTEM_PROMPT_TOO_LONG),
    ],
    ids=["blank", "too-long", "unknown-model", "too-hot", "negative", "nan", "long-system-prompt"],
)
def test_a_bad_turn_is_refused_with_its_reason(alice, change, message) -> None:
    arguments = {"user_id": alice.pk, "conversation_id": None, "mode": "send", "content": "hi", "model": MODEL, **change}
    with pytest.raises(InvalidTurn) as refused:
        services.turn_begin(**arguments)
    assert refused.value.message == message
    assert not Conversation.objects.exists()


def test_nobody_can_touch_another_users_conversation(alice, bob) -> None:
    conversation = send(alice, "private").conversation
    with pytest.raises(ConversationNotFound):
        send(bob, "let me in", conversation)
    with pytest.raises(ConversationNotFound):
        answer(bob, conversation, "sneaky")
    with pytest.raises(ConversationNotFound):
        services.conversation_rename(user_id=bob.pk, conversation_id=conversation.pk, title="mine")
    with pytest.raises(ConversationNotFound):
        services.conversation_delete(user_id=bob.pk, conversation_id=conversation.pk)
    with pytest.raises(ConversationNotFound):
        selectors.conversation_for(user_id=bob.pk, conversation_id=conversation.pk)
    assert list(Message.objects.values_list("content", flat=True)) == ["private"]
    assert Conversation.objects.get().title == "private"


# --- Answers ------------------------------------------------------------------------------------


def test_an_answer_follows_a_message_of_the_user(alice) -> None:
    conversation = send(alice, "hi").conversation
    answer(alice, conversation, "hello")
    with pytest.raises(InvalidTurn, match=services.ANSWER_WITHOUT_MESSAGE):
        answer(alice, conversation, "hello again")


@pytest.mark.parametrize(
    ("content", "state", "fields", "message"),
    [
        ("text", "finished", {}, "Unknown answer state 'finished'."),
        ("some text", "failed", {}, services.FAILED_WITH_TEXT),
        ("x" * 100_001, "complete", {}, services.MESSAGE_TOO_LONG),
        ("text", "complete", {"model": "made-up-model"}, services.UNKNOWN_ANSWER_MODEL.format(model="made-up-model")),
    ],
    ids=["unknown-state", "failed-with-text", "longer-than-any-answer", "model-not-served"],
)
def test_a_bad_answer_is_refused(alice, content, state, fields, message) -> None:
    conversation = send(alice, "hi").conversation
    with pytest.raises(InvalidTurn) as refused:
        answer(alice, conversation, content, state=state, **fields)
    assert refused.value.message == message
    assert not Message.objects.filter(role="assistant").exists()


def test_an_answer_is_saved_once_per_call(alice) -> None:
    conversation = send(alice, "hi").conversation
    request_id = uuid.uuid4()
    answer(alice, conversation, "hello", request_id=request_id)
    send(alice, "again", conversation)
    with pytest.raises(InvalidTurn, match=services.ANSWER_SAVED):
        answer(alice, conversation, "hello", request_id=request_id)


def test_an_answer_shows_its_calls_tokens_cost_and_time_to_first_token_from_the_ledger(alice) -> None:
    conversation = send(alice, "hi").conversation
    row = ledger_row(alice, prompt=120, completion=30)
    answer(alice, conversation, "hello", request_id=row.request_id)
    [question, reply] = selectors.messages_with_usage(conversation)
    assert question.usage is None
    assert reply.usage == selectors.AnswerUsage(
        prompt_tokens=120, completion_tokens=30, cost_usd=row.cost_usd, ttft_us=250_000, status="completed"
    )
    assert row.cost_usd == Decimal("0.00018")  # 120 x $1 + 30 x $2 per 1M


def test_an_answer_shows_no_figures_until_its_call_is_in_the_ledger_and_never_another_users(alice, bob) -> None:
    conversation = send(alice, "hi").conversation
    waiting = answer(alice, conversation, "hello", request_id=uuid.uuid4())
    assert selectors.messages_with_usage(conversation)[1].usage is None
    waiting.delete()
    bobs_call = ledger_row(bob)  # an answer saved before bob's row was written, say
    Message.objects.create(conversation=conversation, role="assistant", content="hello", request_id=bobs_call.request_id)
    assert selectors.messages_with_usage(conversation)[1].usage is None


def test_an_answer_cannot_claim_another_users_call(alice, bob) -> None:
    conversation = send(alice, "hi").conversation
    bobs_call = ledger_row(bob)
    with pytest.raises(InvalidTurn, match=services.NOT_YOUR_CALL):
        answer(alice, conversation, "hello", request_id=bobs_call.request_id)
    assert not Message.objects.filter(role="assistant").exists()
    own_call = ledger_row(alice)
    assert answer(alice, conversation, "hello", request_id=own_call.request_id).request_id == own_call.request_id


@pytest.mark.django_db(transaction=True)
def test_two_saves_of_one_call_at_the_same_moment_keep_one_answer_and_refuse_the_other(alice) -> None:
    """The second save passes every check while the first is uncommitted, then meets the unique
    constraint: a 4xx (ANSWER_SAVED), not an IntegrityError."""
    first, second = send(alice, "one").conversation, send(alice, "two").conversation
    request_id = uuid.uuid4()
    inserted, release = threading.Event(), threading.Event()

    def save_and_hold() -> None:
        try:
            with transaction.atomic():
                answer(alice, first, "hello", request_id=request_id)
                inserted.set()
                release.wait(10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=save_and_hold)
    holder.start()
    try:
        assert inserted.wait(10)
        threading.Timer(0.3, release.set).start()  # the second save waits on the first's row meanwhile
        with pytest.raises(InvalidTurn, match=services.ANSWER_SAVED):
            answer(alice, second, "hello", request_id=request_id)
    finally:
        release.set()
        holder.join(10)
    assert list(Message.objects.filter(role="assistant").values_list("conversation_id", flat=True)) == [first.pk]


def test_the_database_refuses_an_empty_or_billed_user_message(alice) -> None:
    conversation = send(alice, "hi").conversation
    for fields in ({"content": ""}, {"content": "x", "request_id": uuid.uuid4()}, {"content": "x", "state": "stopped"}):
        with pytest.raises(IntegrityError), transaction.atomic():
            Message.objects.create(conversation=conversation, role="user", **fields)


# --- The sidebar --------------------------------------------------------------------------------


def test_conversations_are_listed_newest_activity_first_and_searched_by_title_or_message(alice, bob) -> None:
    apples = send(alice, "About apples").conversation
    bananas = send(alice, "About bananas").conversation
    answer(alice, bananas, "Bananas are yellow.")
    send(bob, "About apples too")
    answer(alice, apples, "Apples are red.")  # apples is now the most recent
    assert [item.title for item in selectors.conversations_for(user_id=alice.pk)] == ["About apples", "About bananas"]
    assert [item.title for item in selectors.conversations_for(user_id=alice.pk, search="YELLOW")] == ["About bananas"]
    assert [item.title for item in selectors.conversations_for(user_id=alice.pk, search="apples")] == ["About apples"]


def test_rename_and_delete(alice) -> None:
    conversation = send(alice, "hi").conversation
    answer(alice, conversation, "hello")
    assert services.conversation_rename(user_id=alice.pk, conversation_id=conversation.pk, title="  Greetings \n").title == "Greetings"
    with pytest.raises(InvalidTurn, match=services.EMPTY_TITLE):
        services.conversation_rename(user_id=alice.pk, conversation_id=conversation.pk, title="  ")
    services.conversation_delete(user_id=alice.pk, conversation_id=conversation.pk)
    assert not Conversation.objects.exists() and not Message.objects.exists()


# --- Prices and spend ---------------------------------------------------------------------------


def test_models_are_offered_with_the_price_this_user_pays(alice) -> None:
    catalog = {choice.id: choice for choice in selectors.model_choices(account=selectors.account_of(alice.pk), at=timezone.now())}
    assert (catalog[MODEL].input_usd_per_1m, catalog[MODEL].output_usd_per_1m) == (Decimal(1), Decimal(2))
    assert catalog[MODEL].context_window == 16_384
    account = account_get_or_create(user_id=alice.pk)
    AccountPrice.objects.create(account=account, model=MODEL, input_usd_per_1m=Decimal("0.5"), output_usd_per_1m=Decimal("1.5"))
    negotiated = {choice.id: choice for choice in selectors.model_choices(account=selectors.account_of(alice.pk), at=timezone.now())}
    assert (negotiated[MODEL].input_usd_per_1m, negotiated[MODEL].output_usd_per_1m) == (Decimal("0.5"), Decimal("1.5"))


def test_every_offered_price_is_what_a_call_pays_and_is_read_in_three_queries(alice, django_assert_num_queries) -> None:
    """The page prices the whole catalog at once; a call prices its own model (`rates_for`): the same rule."""
    routes = list(available_routes())
    others = [route for route in routes if route.id != MODEL]
    assert len(others) >= 2
    plan = PricingPlan.objects.create(name="reseller", multiplier=Decimal("1.5"))
    account = account_get_or_create(user_id=alice.pk)
    account.plan = plan
    account.save(update_fields=["plan"])
    AccountPrice.objects.create(account=account, model=others[0].id, input_usd_per_1m=Decimal("0.5"), output_usd_per_1m=Decimal("1.5"))
    PlanPrice.objects.create(plan=plan, model=others[1].id, input_usd_per_1m=Decimal("7"), output_usd_per_1m=Decimal("9"))
    account = selectors.account_of(alice.pk)
    at = timezone.now()
    with django_assert_num_queries(3):
        offered = {choice.id: choice for choice in selectors.model_choices(account=account, at=at)}
    for route in routes:
        rates = rates_for(account=account, model=route.id, upstream_model=route.upstream_model, at=at)
        expected = (None, None) if rates is None else (
            rates.cost(prompt_tokens=1_000_000, cached_tokens=0, completion_tokens=0),
            rates.cost(prompt_tokens=0, cached_tokens=0, completion_tokens=1_000_000),
        )
        assert (offered[route.id].input_usd_per_1m, offered[route.id].output_usd_per_1m) == expected, route.id
    assert offered[MODEL].input_usd_per_1m == Decimal("1.5")  # the catalog's $1, times the plan's 1.5
    assert offered[others[0].id].input_usd_per_1m == Decimal("0.5") and offered[others[1].id].input_usd_per_1m == Decimal(7)


def test_spend_counts_this_months_calls_and_warns_past_the_soft_threshold(alice) -> None:
    assert selectors.spend_summary(user_id=alice.pk, at=timezone.now()) == selectors.SpendSummary(
        month_spent_usd=Decimal(0), day_spent_usd=Decimal(0), budgets=(), soft_threshold=None
    )
    row = ledger_row(alice, prompt=1_000_000, completion=0)  # $1
    account_quota_set(user_id=alice.pk, monthly_spend_limit_usd=Decimal("2.00"))
    half_used = selectors.spend_summary(user_id=alice.pk, at=timezone.now())
    assert half_used.month_spent_usd == row.cost_usd == Decimal(1)
    [monthly] = half_used.budgets
    assert (monthly.limit, monthly.left) == (Decimal(2), Decimal(1))
    assert half_used.past_threshold == []

    account_quota_set(user_id=alice.pk, monthly_spend_limit_usd=Decimal("1.20"))  # 83%, past the default 80%
    nearly_spent = selectors.spend_summary(user_id=alice.pk, at=timezone.now())
    assert [budget.left for budget in nearly_spent.past_threshold] == [Decimal("0.20")]


# --- The admin ----------------------------------------------------------------------------------


def test_staff_read_conversations_in_the_admin_without_changing_them(alice, admin_client, django_assert_max_num_queries) -> None:
    for index in range(5):
        conversation = send(alice, f"Question {index}").conversation
        answer(alice, conversation, f"Answer {index}")
    with django_assert_max_num_queries(12):
        listing = admin_client.get("/admin/chat/conversation/")
    assert listing.status_code == 200
    assert "Question 4" in listing.content.decode() and "alice" in listing.content.decode()
    detail = admin_client.get(f"/admin/chat/conversation/{conversation.pk}/change/")
    assert detail.status_code == 200
    assert "Answer 4" in detail.content.decode()
    assert admin_client.post(f"/admin/chat/conversation/{conversation.pk}/change/", {"title": "edited"}).status_code == 403
    assert Conversation.objects.get(pk=conversation.pk).title == "Question 4"


def test_a_conversations_newest_messages_have_an_index() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        indexes = connection.introspection.get_constraints(cursor, Message._meta.db_table)
    assert indexes["chat_message_newest"]["columns"] == ["conversation_id", "id"]
    assert indexes["chat_message_newest"]["orders"] == ["ASC", "DESC"]
