"""The chat page in a real headless Chromium, against a gateway served by Granian and a fake upstream.

The fake upstream answers `tokens` chunks of `token_text`, so a test writes the model's answer;
`gpt-4o-mini` goes to it (`sim-*` models are the in-process simulator).
"""

from __future__ import annotations

import re
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import UsageRecord
from billing.selectors import rates_for
from billing.services import account_get_or_create, account_quota_set, usage_record_create
from chat.models import Conversation, Message
from tests.chat.conftest import screenshot, wait_for_js, wait_for_records

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.ledger]

MODEL = "gpt-4o-mini"
ANSWER = ".msg.assistant"
LAST_ANSWER = ".msg.assistant >> nth=-1"


def send(page: Any, text: str, model: str = MODEL) -> None:
    """Type a message and press Enter, as a user does."""
    page.select_option("#model", model)
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_for_answer(page: Any, state: str = "complete", timeout: float = 10_000) -> Any:
    page.wait_for_selector(f"{ANSWER}[data-state={state}]", timeout=timeout)
    return page.locator(LAST_ANSWER)


def test_enter_sends_and_the_answer_grows_over_several_frames_then_shows_its_cost(page, answer, screenshot_dir) -> None:
    answer.tokens, answer.token_text, answer.inter_token_delay = 24, "word ", 0.04
    page.fill("#prompt", "first line")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "second line")
    assert page.locator(".msg.user").count() == 0, "Shift+Enter must not send"
    page.select_option("#model", MODEL)
    page.press("#prompt", "Enter")

    lengths = page.evaluate(
        """() => new Promise((resolve) => {
            const seen = [];
            const sample = () => {
                const answer = document.querySelector('.msg.assistant');
                if (answer) seen.push(answer.querySelector('.body').textContent.length);
                if (answer && answer.dataset.state !== 'streaming') resolve(seen);
                else requestAnimationFrame(sample);
            };
            sample();
        })"""
    )
    growing = sorted(set(length for length in lengths if length > 0))
    assert len(growing) >= 4, f"the answer appeared in {len(growing)} steps: {lengths}"
    done = wait_for_answer(page)
    assert done.locator(".body").inner_text().strip() == ("word " * 24).strip()
    assert page.locator(".msg.user .body").inner_text() == "first line\nsecond line"
    done.locator(".meta .cost").wait_for()
    [record] = wait_for_records(1)
    meta = done.locator(".meta").inner_text()
    assert f"{record.prompt_tokens} in · 24 out" in meta
    assert "$0.0" in meta and "first token" in meta
    assert record.status == "completed" and record.completion_tokens == 24
    assert record.api_key is None and record.user.username == "dana"  # billed to the session's user
    [question, reply] = Message.objects.order_by("id")
    assert (question.role, question.content) == ("user", "first line\nsecond line")
    assert (reply.role, reply.state, reply.request_id) == ("assistant", "complete", record.request_id)
    assert page.locator("#spend-line").inner_text().startswith("This month $0.0")
    assert page.errors == []
    screenshot(page, screenshot_dir, "chat-answer-1280.png")


MARKDOWN = """Here is **bold** text and a list:

- one
- two

| model | price |
|-------|-------|
| a     | $1    |

```python
print("hello")
```

<script>window.__pwned = "script"</script>
<img src="x" onerror="window.__pwned = 'img'">
[click](javascript:window.__pwned='link')
"""


def test_markdown_renders_as_html_but_html_from_the_model_is_inert(page, answer) -> None:
    answer.tokens, answer.token_text = 1, MARKDOWN
    send(page, "show me markdown")
    done = wait_for_answer(page)
    body = done.locator(".body")
    assert body.locator("strong").inner_text() == "bold"
    assert body.locator("li").all_inner_texts() == ["one", "two"]
    assert body.locator("table td").all_inner_texts() == ["a", "$1"]
    assert body.locator("pre code.language-python").inner_text().strip() == 'print("hello")'
    assert body.locator(".code button.copy").count() == 1
    # The model's HTML is shown as text, never as elements, and nothing ran.
    assert body.locator("script, img, [onerror]").count() == 0
    assert "<script>" in body.inner_text() and "onerror" in body.inner_text()
    assert body.locator("a[href^='javascript']").count() == 0
    assert page.evaluate("window.__pwned") is None
    page.reload()
    page.wait_for_selector(f"{ANSWER}[data-state=complete]")
    assert page.locator(f"{ANSWER} pre code").count() == 1
    assert page.evaluate("window.__pwned") is None
    assert page.errors == []


def test_the_copy_button_copies_a_code_block(page, answer) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    answer.tokens, answer.token_text = 1, "```\nmake test\n```\n"
    send(page, "how do I test?")
    done = wait_for_answer(page)
    done.locator("button.copy").click()
    wait_for_js(page, "document.querySelector('button.copy').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == "make test\n"


def test_stop_mid_answer_keeps_what_arrived_and_the_ledger_row_is_cancelled_with_partial_tokens(page, answer) -> None:
    answer.tokens, answer.token_text, answer.inter_token_delay = 200, "slow ", 0.03
    send(page, "Tell me a long story")
    wait_for_js(page, "document.querySelector('.msg.assistant .body')?.textContent.length > 20")
    page.click("#stop")
    stopped = wait_for_answer(page, "stopped")
    shown = stopped.locator(".body").inner_text()
    [record] = wait_for_records(1)
    assert record.status == "cancelled"
    assert 0 < record.completion_tokens < 200
    assert "Stopped" in stopped.locator(".notice").inner_text()
    saved = Message.objects.get(role="assistant")
    assert saved.state == "stopped" and saved.content.strip() == shown.strip() and saved.request_id == record.request_id
    # The ledger row arrives just after the hang-up; the page then shows what the part cost.
    stopped.locator(".meta .cost").wait_for(timeout=5_000)
    assert f"{record.completion_tokens} out" in stopped.locator(".meta").inner_text()


def test_reloading_mid_answer_keeps_what_arrived_as_a_stopped_answer(page, answer) -> None:
    answer.tokens, answer.token_text, answer.inter_token_delay = 200, "slow ", 0.03
    send(page, "Tell me a long story")
    wait_for_js(page, "document.querySelector('.msg.assistant .body')?.textContent.length > 20")
    page.reload()
    kept = wait_for_answer(page, "stopped")  # the new page shows it once the old page's save lands
    assert kept.locator(".body").inner_text().startswith("slow slow slow slow")
    assert "the page was left or reloaded" in kept.locator(".notice").inner_text()
    [record] = wait_for_records(1)
    saved = Message.objects.get(role="assistant")
    assert record.status == "cancelled" and saved.request_id == record.request_id
    assert 0 < record.completion_tokens < 200 and saved.content.startswith("slow slow slow slow")


def test_stopping_before_the_first_token_says_where_any_charge_shows_not_that_it_was_free(page, answer) -> None:
    """The gateway answers when the upstream's first token arrives: a Stop before that leaves the
    page without the call's request id, though the ledger bills the prompt (a cancelled row)."""
    answer.tokens, answer.token_text, answer.ttft = 3, "late ", 3.0
    send(page, "Take your time")
    page.wait_for_selector(f"{ANSWER}[data-state=streaming]")
    deadline = time.monotonic() + 5
    while not answer.requests and time.monotonic() < deadline:  # the call reaches the upstream, which waits
        time.sleep(0.02)
    assert answer.requests and not page.evaluate("document.querySelector('.msg.assistant .body').textContent")
    page.click("#stop")
    stopped = wait_for_answer(page, "stopped")
    [record] = wait_for_records(1)
    assert record.status == "cancelled" and record.cost_usd > 0
    saved = Message.objects.get(role="assistant")
    assert saved.state == "stopped" and saved.request_id is None
    meta = stopped.locator(".meta").inner_text()
    assert "not charged" not in meta
    assert "Any charge for it shows in your usage on the account page." in meta
    assert stopped.locator(".meta a").get_attribute("href") == "/account/"


def test_a_stream_that_ends_without_text_after_a_200_is_cut_off_and_shows_its_cost(page, answer) -> None:
    """After a 200 the upstream was called and the prompt may be billed: an end with no text is
    cut off (not "failed, not charged"), and the page reads its cost from the ledger."""
    answer.tokens, answer.fault, answer.fault_after_tokens = 5, "error_frame", 0
    send(page, "Say nothing")
    cut = wait_for_answer(page, "cut_off")
    assert cut.locator(".body").inner_text().strip() == ""
    assert "Cut off" in cut.locator(".notice").inner_text()
    [record] = wait_for_records(1)
    saved = Message.objects.get(role="assistant")
    assert saved.state == "cut_off" and saved.request_id == record.request_id
    cut.locator(".meta .cost").wait_for(timeout=5_000)
    meta = cut.locator(".meta").inner_text()
    assert f"{record.prompt_tokens} in" in meta and "not charged" not in meta


def test_an_answer_saved_seconds_after_a_reload_still_appears_in_the_reloaded_page(page, answer) -> None:
    answer.tokens, answer.token_text, answer.inter_token_delay = 200, "slow ", 0.03
    send(page, "Tell me a long story")
    wait_for_js(page, "document.querySelector('.msg.assistant .body')?.textContent.length > 20")
    # The old page's save is held back (as by a slow network), and lands well after the new page loaded.
    page.evaluate("const send = window.fetch; window.fetch = (url, options) => options?.keepalive ? new Promise(() => {}) : send(url, options)")
    page.reload()
    page.wait_for_selector(".msg.user")
    time.sleep(1.5)
    conversation = Conversation.objects.get()
    Message.objects.create(conversation=conversation, role="assistant", content="slow slow", state="stopped", model=MODEL)
    kept = wait_for_answer(page, "stopped", timeout=5_000)
    assert kept.locator(".body").inner_text() == "slow slow"
    assert not page.locator("button.regenerate", has_text="Answer this").count()


def test_a_rate_limited_call_says_so_with_a_countdown_from_retry_after(page, answer, screenshot_dir) -> None:
    answer.fault, answer.retry_after = "429", 30
    send(page, "hello?")
    failed = wait_for_answer(page, "failed")
    notice = failed.locator(".notice")
    assert "Too many requests" in notice.inner_text()
    first = int(re.search(r"retry in (\d+) s", notice.inner_text()).group(1))
    assert 25 <= first <= 30
    assert failed.locator("button.regenerate").is_disabled()
    wait_for_js(
        page, f"/retry in (\\d+) s/.exec(document.querySelector('.msg.assistant .countdown').textContent)[1] < {first}", timeout=3
    )
    assert Message.objects.get(role="assistant").state == "failed"
    assert "$0.00" in failed.locator(".meta").inner_text()  # the upstream refused before any token: a cost-0 row
    screenshot(page, screenshot_dir, "chat-rate-limited-1280.png")


def test_an_upstream_failure_mid_answer_keeps_what_arrived_marked_cut_off(page_factory, answer, screenshot_dir) -> None:
    page = page_factory(390, 844)
    answer.tokens, answer.token_text, answer.fault, answer.fault_after_tokens = 20, "part ", "error_frame", 5
    send(page, "go")
    cut = wait_for_answer(page, "cut_off")
    assert cut.locator(".body").inner_text().strip() == ("part " * 5).strip()
    assert "Cut off" in cut.locator(".notice").inner_text()
    assert cut.locator("button.regenerate").inner_text() == "Retry"
    saved = Message.objects.get(role="assistant")
    assert saved.state == "cut_off" and saved.content.strip() == ("part " * 5).strip()
    screenshot(page, screenshot_dir, "chat-cut-off-390.png")


def test_a_spent_budget_is_explained_in_the_conversation(page, answer) -> None:
    account_quota_set(user_id=get_user_model().objects.get(username="dana").pk, monthly_spend_limit_usd=0)
    send(page, "anything")
    failed = wait_for_answer(page, "failed")
    assert "budget is used up" in failed.locator(".notice").inner_text()
    assert "not charged" in failed.locator(".meta").inner_text()
    assert answer.requests == [] and not UsageRecord.objects.exists()


def test_a_lost_connection_shows_a_retry_button_that_answers_again(page, answer) -> None:
    answer.tokens, answer.token_text = 3, "back "
    page.route("**/chat/completions", lambda route: route.abort("internetdisconnected"))
    send(page, "are you there?")
    failed = wait_for_answer(page, "failed")
    assert "connection to the gateway was lost" in failed.locator(".notice").inner_text()
    assert "Any charge for it shows in your usage" in failed.locator(".meta").inner_text()  # no headers, no request id
    page.unroute("**/chat/completions")
    failed.locator("button.regenerate").click()
    done = wait_for_answer(page)
    assert done.locator(".body").inner_text().strip() == "back back back"
    assert list(Message.objects.order_by("id").values_list("role", "state")) == [("user", "complete"), ("assistant", "complete")]


def test_a_stale_csrf_token_says_to_reload_the_page(page, answer) -> None:
    def without_token(route: Any) -> None:
        headers = {name: value for name, value in route.request.headers.items() if name.lower() != "x-csrftoken"}
        route.continue_(headers=headers)

    page.route("**/chat/completions", without_token)  # as after a new login in another tab
    send(page, "hello")
    failed = wait_for_answer(page, "failed")
    assert "Reload the page to go on." in failed.locator(".notice").inner_text()
    assert "403" not in failed.locator(".notice").inner_text()
    assert answer.requests == []


def test_reload_reopen_and_continue_sends_the_prior_messages(page, answer, served) -> None:
    answer.tokens, answer.token_text = 2, "blue "
    send(page, "My favourite colour is blue.")
    wait_for_answer(page)
    conversation = Conversation.objects.get()
    assert page.url.endswith(f"/chat/c/{conversation.pk}/")
    assert conversation.title == "My favourite colour is blue."

    page.reload()
    page.wait_for_selector(f"{ANSWER}[data-state=complete]")
    assert page.locator(".msg .body").all_inner_texts() == ["My favourite colour is blue.", "blue blue"]

    page.goto(f"{served.base_url}/chat/")
    page.wait_for_selector(".empty")
    page.click(f"#conversations li[data-id='{conversation.pk}'] a")
    page.wait_for_selector(f"{ANSWER}[data-state=complete]")
    answer.token_text = "yes "
    send(page, "What is my favourite colour?")
    page.wait_for_selector(f"{ANSWER} >> nth=1", state="attached")
    wait_for_js(page, "document.querySelectorAll('.msg.assistant[data-state=complete]').length === 2")
    assert answer.last_request.body["messages"] == [
        {"role": "user", "content": "My favourite colour is blue."},
        {"role": "assistant", "content": "blue blue "},
        {"role": "user", "content": "What is my favourite colour?"},
    ]
    assert Conversation.objects.count() == 1 and Message.objects.count() == 4


def test_regenerate_and_edit_the_last_message(page, answer) -> None:
    answer.tokens, answer.token_text = 2, "one "
    page.click("#settings summary")
    page.fill("#system-prompt", "Answer in French.")
    page.fill("#temperature", "0.3")
    send(page, "Say one")
    wait_for_answer(page)
    answer.token_text = "two "
    page.click(f"{ANSWER} button.regenerate")
    wait_for_js(page, "document.querySelector('.msg.assistant[data-state=complete] .body')?.textContent.trim() === 'two two'")
    regenerated = answer.last_request.body
    assert regenerated["messages"] == [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say one"}]
    assert regenerated["temperature"] == 0.3

    page.click(".msg.user button.edit")
    page.fill(".edit-box textarea", "Say three")
    answer.token_text = "three "
    page.press(".edit-box textarea", "Enter")
    wait_for_js(page, "document.querySelector('.msg.assistant[data-state=complete] .body')?.textContent.trim() === 'three three'")
    assert answer.last_request.body["messages"][-1] == {"role": "user", "content": "Say three"}
    assert list(Message.objects.order_by("id").values_list("role", "content")) == [("user", "Say three"), ("assistant", "three three ")]
    assert len(UsageRecord.objects.all()) == 3  # every call stays in the ledger


def test_the_sidebar_lists_newest_first_and_renames_deletes_and_searches(page, answer) -> None:
    answer.tokens, answer.token_text = 1, "ok "
    for text in ("About apples", "About bananas", "About cherries"):
        page.click("#new-chat")
        send(page, text)
        wait_for_js(page, f"document.querySelector('#title').textContent === {text!r} && document.querySelector('.msg.assistant[data-state=complete]') !== null")
    titles = page.locator("#conversations li a").all_inner_texts()
    assert titles == ["About cherries", "About bananas", "About apples"]

    bananas = Conversation.objects.get(title="About bananas")
    item = page.locator(f"#conversations li[data-id='{bananas.pk}']")
    item.locator("button.rename").click()
    item.locator("input").fill("Yellow fruit")
    item.locator("input").press("Enter")
    page.wait_for_selector("#conversations li a:text('Yellow fruit')")
    assert Conversation.objects.get(pk=bananas.pk).title == "Yellow fruit"

    page.fill("#search", "apples")
    wait_for_js(page, "document.querySelectorAll('#conversations li').length === 1")
    assert page.locator("#conversations li a").all_inner_texts() == ["About apples"]
    page.fill("#search", "")
    wait_for_js(page, "document.querySelectorAll('#conversations li').length === 3")

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f"#conversations li[data-id='{bananas.pk}'] button.delete").click()
    wait_for_js(page, "document.querySelectorAll('#conversations li').length === 2")
    assert not Conversation.objects.filter(pk=bananas.pk).exists()
    page.reload()
    page.wait_for_selector("#conversations li")
    assert page.locator("#conversations li a").all_inner_texts() == ["About cherries", "About apples"]


def test_screenshots_at_desktop_and_phone_width(page_factory, answer, screenshot_dir) -> None:
    answer.tokens, answer.token_text = 1, MARKDOWN.split("<script>")[0]
    desktop = page_factory(1280, 800)
    send(desktop, "Show me a list, a table and some code")
    wait_for_answer(desktop).locator(".meta .cost").wait_for()
    screenshot(desktop, screenshot_dir, "chat-1280.png")
    url = desktop.url

    phone = page_factory(390, 844)
    phone.goto(url)
    phone.wait_for_selector(f"{ANSWER}[data-state=complete]")
    # At phone width the page does not scroll sideways, and the composer is on screen.
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    box = phone.locator("#composer").bounding_box()
    assert box is not None and box["y"] + box["height"] <= 844 + 1
    assert phone.locator("#sidebar").bounding_box()["x"] < 0  # tucked away
    screenshot(phone, screenshot_dir, "chat-390.png")
    phone.click("#toggle-sidebar")
    wait_for_js(phone, "document.querySelector('#sidebar').getBoundingClientRect().x >= 0")
    time.sleep(0.2)  # the slide-in transition, for the picture only
    screenshot(phone, screenshot_dir, "chat-390-sidebar.png")


def test_the_composer_stays_pinned_and_the_header_stays_when_the_conversation_is_long(page, answer) -> None:
    answer.tokens, answer.token_text = 60, "A long paragraph line.\n\n"
    send(page, "write a lot")
    wait_for_answer(page)
    assert page.evaluate("document.querySelector('#log').scrollHeight > document.querySelector('#log').clientHeight")
    assert page.evaluate("window.scrollY") == 0
    assert page.locator("body > header").bounding_box()["y"] == 0
    composer = page.locator("#composer").bounding_box()
    assert composer["y"] + composer["height"] <= 800 + 1


def test_spend_and_what_is_left_are_always_shown_with_the_soft_threshold_warning(page_factory, answer, user, screenshot_dir) -> None:
    now = timezone.now()
    account = account_get_or_create(user_id=user.pk)
    usage_record_create(
        request_id=uuid.uuid4(), user_id=user.pk, api_key_id=None, model=MODEL, upstream_model=MODEL, provider="openai",
        stream=True, status="completed", error_kind="", prompt_tokens=280_000, completion_tokens=0, cached_tokens=0,
        reasoning_tokens=0, token_source="upstream", ttft_us=300_000, duration_us=2_000_000, created_at=now,
        rates=rates_for(account=account, model=MODEL, at=now),
    )  # $0.042
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=Decimal("0.05"))
    page = page_factory()
    assert page.locator("#spend-line").inner_text() == "This month $0.042 spent · $0.008 left of $0.05"
    assert page.locator("#spend .warning").inner_text() == "You have used 84% of this month's spend budget."

    answer.tokens, answer.token_text = 2000, "x "  # 2,000 output tokens: $0.0012
    send(page, "One more, please")
    wait_for_answer(page).locator(".meta .cost").wait_for()
    assert page.locator("#spend-line").inner_text().startswith("This month $0.043 spent · $0.0068 left of $0.05")
    assert page.locator("#spend .warning").inner_text() == "You have used 86% of this month's spend budget."
    screenshot(page, screenshot_dir, "chat-budget-1280.png")


def test_the_chat_page_requires_login(browser, served) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{served.base_url}/chat/")
    assert "/accounts/login/" in page.url
    context.close()


def test_the_favicon_is_served(page, served) -> None:
    response = page.request.get(f"{served.base_url}/favicon.ico")
    assert response.status == 200 and response.headers["content-type"] == "image/x-icon"
