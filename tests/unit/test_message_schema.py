"""The chat-message validation patches: parts pass vLLM's schema unchecked and in place.

Over HTTP the placed hostile table checks the messages clients get
(``tests/e2e/test_hostile_online.py``); this checks the validated requests themselves.
"""

from __future__ import annotations

import pytest

import vllm_chat_embeds

pytestmark = pytest.mark.unit

TEXT = {"type": "text", "text": "x"}
BAD = [{"type": "prompt_embeds"}, {"type": "prompt_embeds", "data": 42}]
CONTENTS = [[bad] for bad in BAD] + [[bad, TEXT] for bad in BAD] + [[TEXT, bad] for bad in BAD]


@pytest.fixture(scope="module")
def models():
    vllm_chat_embeds.register()
    from vllm.entrypoints.openai.chat_completion.protocol import (
        BatchChatCompletionRequest,
        ChatCompletionRequest,
    )
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest

    return ChatCompletionRequest, BatchChatCompletionRequest, TokenizeChatRequest


@pytest.mark.parametrize("role", ["user", "system", "assistant", "tool", "developer"])
@pytest.mark.parametrize("content", CONTENTS)
def test_malformed_parts_come_back_as_sent_in_a_list(models, role, content):
    chat, batch, tokenize = models
    message = {"role": role, "content": content}
    for request in (chat(model="m", messages=[message]), tokenize(model="m", messages=[message])):
        assert request.messages[0]["content"] == content
        assert isinstance(request.messages[0]["content"], list)
    batched = batch(model="m", messages=[[message], [{"role": "user", "content": "hi"}]])
    assert batched.messages[0][0]["content"] == content
    single = batched.to_chat_completion_request(batched.messages[0])
    assert single.messages[0]["content"] == content


def test_other_bad_content_still_fails_vllms_validation(models):
    import pydantic

    chat = models[0]
    with pytest.raises(pydantic.ValidationError):
        chat(model="m", messages=[{"role": "user", "content": 42}])
