"""The backbone's chat template, rendered with jinja2 alone exactly as transformers'
``apply_chat_template(messages, tokenize=False, add_generation_prompt=False)`` renders it.

transformers compiles a template in an immutable sandbox with ``trim_blocks`` and
``lstrip_blocks``, the loop-controls extension and a ``{% generation %}`` block tag, its own
``tojson`` filter (no HTML escaping, ``ensure_ascii=False``), the globals ``raise_exception``,
``strftime_now``, a restricted ``dict`` and a ``namespace`` that refuses underscore names,
and renders with ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the
tokenizer's named special tokens (``bos_token``, ``eos_token`` ...). The same environment is
built here, so a trajectory renders to the same bytes without transformers (tested byte for
byte on generated message lists).
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Optional


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("trajectory guards render the backbone's chat template with jinja2: "
                          "pip install 'jinja2>=3.1.6'") from e
    return jinja2, ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The chat template refused the messages (its raise_exception, or a render error)."""


def _environment():
    jinja2, Sandbox = _jinja()

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it to
        find assistant tokens; the text is unchanged)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore names ({name!r})")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: Optional[dict] = None):
        jinja2, _ = _jinja()
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(f"the bundle's chat template does not compile: {e}") from None
        self._special = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}

    def render(self, messages: list) -> str:
        """The rendered conversation (no generation prompt); TemplateError if the template refuses it."""
        jinja2, _ = _jinja()
        try:
            return self._template.render(messages=messages, tools=None, documents=None, add_generation_prompt=False,
                                         **self._special)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(str(e) or type(e).__name__) from None
        except Exception as e:          # a template's own runtime error (a bad index, a type error)
            raise TemplateError(f"{type(e).__name__}: {e}") from None


__all__ = ["ChatTemplate", "TemplateError"]
