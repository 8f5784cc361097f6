"""Text around the token ids: incremental detokenizing with stop strings, and chat templates.

- ``Detokenizer(tokenizer, stop, eos).add(token) -> (new text, stopped)``: decodes the whole generation
  each time (token boundaries may merge) and hands out only text that cannot be the start of a stop
  string; when a stop string appears, the text ends before it and ``stopped`` is True. EOS tokens add no
  text. Without a tokenizer there is no text (the ids are returned beside it).
- ``ChatTemplate.load(model_dir)`` reads ``chat_template.jinja`` or ``tokenizer_config.json``'s
  ``chat_template`` (a string, or a list of named templates: "default" or the first); None when the
  checkpoint has none. ``render(messages)`` runs it in jinja2's immutable sandbox with what HF templates
  expect (``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt``, ``raise_exception``).
  Errors are ``TemplateError`` with the template's own words.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_runtime.core.errors import MoeError


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str], eos: set[int]) -> None:
        self.tokenizer, self.stop, self.eos = tokenizer, [s for s in stop if s], eos
        self.ids: list[int] = []
        self.sent = 0  # characters of the text handed out so far
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string's prefix may be pending

    def add(self, token: int) -> tuple[str, bool]:
        if self.tokenizer is None:
            return "", False
        if token not in self.eos:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if self.stop:
            start = max(self.sent - self.hold, 0)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                out, self.sent = text[self.sent:end], end
                return out, True
        if token in self.eos:  # the end: nothing is held back any more
            out, self.sent = text[self.sent:], len(text)
            return out, False
        safe = len(text)
        for s in self.stop:  # keep back the longest tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if s.startswith(text[-k:]):
                    safe = min(safe, len(text) - k)
                    break
        safe = max(safe, self.sent)
        out, self.sent = text[self.sent:safe], safe
        return out, False

    def rest(self) -> str:
        """Text held back when the generation ends at max_tokens (no stop string completed)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out


class TemplateError(MoeError):
    pass


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters.setdefault("tojson", lambda v, indent=None: json.dumps(v, indent=indent))
        try:
            self.template = env.from_string(source)
        except Exception as e:  # noqa: BLE001  jinja2's syntax errors
            raise MoeError(f"the checkpoint's chat template does not parse: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def load(cls, model_dir) -> ChatTemplate | None:
        d = Path(model_dir)
        cfg = {}
        if (d / "tokenizer_config.json").is_file():
            try:
                cfg = json.loads((d / "tokenizer_config.json").read_text())
            except (OSError, ValueError) as e:
                raise MoeError(f"cannot read {d / 'tokenizer_config.json'}: {e}") from None
        source = cfg.get("chat_template")
        if (d / "chat_template.jinja").is_file():
            source = (d / "chat_template.jinja").read_text()
        if isinstance(source, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if not isinstance(source, str) or not source:
            return None
        return cls(source, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt)
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001  a template's runtime error (or a sandbox refusal)
            raise TemplateError(f"the chat template failed on these messages: {e}") from None


def _token_text(value) -> str:
    """tokenizer_config.json gives a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
