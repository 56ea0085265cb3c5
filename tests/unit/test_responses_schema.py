"""The /v1/responses patches in-process: the widened ``input`` schema and the Harmony refusal.

The end-to-end behaviour (parity, errors over HTTP) is in ``tests/e2e/test_responses_online.py``;
this covers what a tiny model cannot reach: the Harmony (gpt-oss) path.
"""

from __future__ import annotations

import pydantic
import pytest
from vllm.exceptions import VLLMValidationError

import vllm_chat_embeds
from vllm_chat_embeds import errors
from vllm_chat_embeds.renderers.parts import LocatedPart, first_embeds_part

pytestmark = pytest.mark.unit

PART = {"type": "prompt_embeds", "data": "AAAA", "encoding": "raw", "dtype": "float32"}


@pytest.fixture(scope="module")
def request_cls():
    vllm_chat_embeds.register()
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return ResponsesRequest


def test_parts_pass_validation_in_place_and_located(request_cls):
    text = {"type": "input_text", "text": "hi"}
    request = request_cls(
        input=[
            {"role": "developer", "content": [PART]},
            {"role": "user", "content": [text, PART, text]},
        ]
    )
    first, second = request.input
    assert isinstance(first["content"][0], LocatedPart)
    assert first["content"][0].where == "input[0].content[0]"
    assert second["content"] == [text, PART, text]
    assert second["content"][1].where == "input[1].content[1]"
    assert first_embeds_part(list(request.input)) == "input[0].content[0]"


def test_input_without_parts_is_validated_as_before(request_cls):
    plain = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    assert request_cls(input=plain).input == plain
    assert request_cls(input="hello").input == "hello"
    # vLLM's own errors keep their content index beside a part.
    with pytest.raises(pydantic.ValidationError) as info:
        request_cls(input=[{"role": "user", "content": [PART, {"type": "bogus"}]}])
    content_indices = set()
    for error in info.value.errors():
        loc = error["loc"]
        if "EasyInputMessageParam" in loc and "content" in loc:  # the branch for user messages
            after = [x for x in loc[loc.index("content") :] if isinstance(x, int)]
            content_indices.update(after[:1])
    assert content_indices == {1}  # the bogus part; never 0, where the prompt_embeds part is


def test_part_in_an_assistant_message_is_refused(request_cls):
    with pytest.raises(VLLMValidationError) as info:
        request_cls(input=[{"role": "assistant", "content": [PART]}])
    assert info.value.args[0] == errors.RESPONSES_ROLE.format(
        where="input[0].content[0]", role="assistant"
    )
    assert info.value.parameter == "input"


def test_harmony_path_refuses_parts(request_cls):
    from vllm.renderers.online_renderer import OnlineRenderer

    request = request_cls(input=[{"role": "user", "content": [PART]}])
    with pytest.raises(VLLMValidationError) as info:
        OnlineRenderer._render_responses_with_harmony(
            None,  # type: ignore[arg-type]  # refused before the renderer is used
            request,
            previous_messages=None,
            previous_response_outputs=None,
            tool_server=None,
        )
    assert info.value.args[0] == errors.RESPONSES_HARMONY.format(where="input[0].content[0]")
    assert info.value.parameter == "input"
