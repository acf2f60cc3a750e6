"""Chat messages → one prompt string, through the bundle's own chat template (no torch, no transformers).

    from runtimes.chat import chat_template_of
    template = chat_template_of(generator)        # None when the bundle has no chat template
    prompt = template.render([{"role": "user", "content": "Hi"}])
    ids = generator.tokenizer.encode(prompt, add_special_tokens=False)   # the template holds them

The template is the Jinja string that transformers keeps as `tokenizer.chat_template` (the build copies
it into generation.json as "chat_template"). It is rendered the way transformers'
`apply_chat_template(..., tokenize=False)` renders it (transformers/utils/chat_template_utils.py):
a sandboxed, immutable Jinja environment with trim_blocks and lstrip_blocks, the loop-controls
extension, a `tojson` filter that does not HTML-escape, the globals `raise_exception` and
`strftime_now`, and the variables `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ._deps import require
from .decoding import GENERATION_FILE
from .errors import InvalidInput, UsageError


class ChatTemplate:
    """A compiled chat template; bos_token / eos_token are the strings the template may insert."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        jinja2 = require("jinja2", extra="genai", purpose="Rendering the bundle's chat template")
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            # Jinja's own tojson HTML-escapes (<, >, &, ') for embedding in web pages; a prompt must not be.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        # Sandboxed and immutable: a template comes with the bundle, and may not reach Python internals
        # or change the messages it is given.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self._errors = (jinja2.exceptions.TemplateError,)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise UsageError(
                f"Expected the bundle's chat template to be valid Jinja, found a syntax error on line {exc.lineno}: "
                f"{exc.message}. Rebuild the bundle from a model folder whose tokenizer_config.json has a working "
                "chat_template, or send plain prompts to /v1/completions."
            ) from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` ({role, content} dicts), ending with the assistant's turn opened
        when add_generation_prompt (the default). The template's raise_exception → InvalidInput."""
        try:
            return str(self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, tools=None, documents=None))
        except self._errors as exc:
            raise InvalidInput(
                f"Expected messages the bundle's chat template accepts, but it refused them: {str(exc)[:300]}. "
                "Change the messages (roles, order) as the message says."
            ) from None


def message_text(content: Any, where: str = "content") -> str:
    """A message's content as one string: a string as is, or a list of {"type": "text", "text": ...}
    parts joined with newlines (as vLLM joins them for templates that expect a string)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    found = type(content).__name__ if not isinstance(content, list) else "a list with other parts than text"
    raise UsageError(
        f"Expected {where} to be a string or a list of {{\"type\": \"text\", \"text\": \"...\"}} parts, found {found}. "
        "Send the message's text as a string (this model reads text only)."
    )


def message_parts(content: Any, where: str = "content") -> tuple[str | list[dict[str, str]], list[str]]:
    """A VLM message's content for the chat template, and its image URLs in order: a string as is; a list
    of OpenAI parts as the template's own parts, {"type": "text", "text": ...} and {"type": "image"} for each
    {"type": "image_url", "image_url": {"url": ...}} (what transformers' processors pass to Qwen-VL templates,
    which write each image's vision placeholders)."""
    if isinstance(content, str):
        return content, []
    parts: list[dict[str, str]] = []
    urls: list[str] = []
    for k, part in enumerate(content if isinstance(content, list) else [None]):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            continue
        url = part.get("image_url") if kind == "image_url" else None
        url = url.get("url") if isinstance(url, Mapping) else url
        if not isinstance(url, str):
            found = type(content).__name__ if not isinstance(content, list) else f"part {k}: {str(part)[:80]}"
            raise UsageError(
                f"Expected {where} to be a string or a list of {{\"type\": \"text\", \"text\": ...}} and "
                f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:image/png;base64,...\"}}}} parts, found "
                f"{found}. Send text parts and images as data: URIs."
            )
        parts.append({"type": "image"})
        urls.append(url)
    return parts, urls


def chat_template_of(generator: Any) -> ChatTemplate | None:
    """The generator's chat template (generation.json "chat_template"), or None when it has none.

    bos_token / eos_token: generation.json "special_tokens" {"bos_token", "eos_token"} when present,
    else the ids "bos_token_id" / "eos_token_ids"[0] decoded with the bundle's tokenizer, special
    tokens kept (the template is what puts them in the prompt)."""
    spec = getattr(generator, "spec", None)
    if not isinstance(spec, Mapping):  # generators that keep no parsed spec: read the file itself
        spec = json.loads((Path(generator.bundle) / GENERATION_FILE).read_text(encoding="utf-8"))
    source = spec.get("chat_template")
    if not source:
        return None
    if not isinstance(source, str):  # transformers also allows a dict of named templates
        raise UsageError(
            f"Expected generation.json's chat_template to be one Jinja string, found {type(source).__name__}. "
            "Rebuild the bundle with a model whose tokenizer has a single chat template."
        )
    named = spec.get("special_tokens") if isinstance(spec.get("special_tokens"), Mapping) else {}
    eos_ids = spec.get("eos_token_ids") or []

    def token(name: str, token_id: Any) -> str:
        if isinstance(named.get(name), str):
            return str(named[name])
        if token_id is None:
            return ""
        return str(generator.tokenizer.decode([int(token_id)], skip_special_tokens=False))

    return ChatTemplate(source, bos_token=token("bos_token", spec.get("bos_token_id")),
                        eos_token=token("eos_token", eos_ids[0] if eos_ids else None))


__all__ = ["ChatTemplate", "chat_template_of", "message_text"]
