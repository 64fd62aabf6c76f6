"""Conversations -> (token ids, loss mask) for supervised fine-tuning.

Two templates (docs/sft_data.md):

* `JinjaChatTemplate`: a Hugging Face chat template, rendered as `transformers`' `apply_chat_template`
  renders it (sandboxed Jinja with trim_blocks and lstrip_blocks, the loop-controls extension, the
  globals `messages`, `add_generation_prompt`, `tools`, `documents`, the tokenizer's named special
  tokens such as `bos_token` / `eos_token`, `raise_exception` and `strftime_now`, and a `tojson`
  that does not escape HTML). The targets are found by rendering growing prefixes: assistant
  message k adds `render(messages[:k+1])[len(render(messages[:k], add_generation_prompt=True)):]`
  to the text, its content and end-of-turn marker; whitespace the template writes after the
  marker (ChatML's newline) is not a target. The text is cut at the targets' edges and the
  pieces are tokenized one by one, so no token straddles prompt and target, and the tokens of a
  target are those the model emits after the prompt's tokens at inference time.
* `DefaultChatTemplate`: for tokenizers without a chat template (SentencePiece, NullTokenizer, a
  bare tokenizer.json):  `<|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}[EOD]`,
  the turns back to back, each answer ending with the tokenizer's EOD id; targets: the answer and
  its EOD. NullTokenizer text is integers, so there the headers are left out.

In the mask, 1 marks a target token: training predicts token i from tokens < i where mask[i] is 1.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from megatron.core.tokenizers.tokenizer import HuggingFaceTokenizer, MegatronTokenizer, NullTokenizer

# The named special tokens transformers hands to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class EncodedConversation:
    tokens: np.ndarray  # int64
    loss_mask: np.ndarray  # uint8, 1 = target
    # False when tokenizing the rendered text at once gives other ids than the pieces did (Jinja only).
    matches_whole_text: bool = True


class ChatTemplate(ABC):
    description: str

    @abstractmethod
    def encode(self, messages: list[dict], where: str = "") -> EncodedConversation:
        """Tokens and loss mask of a checked conversation; ValueError naming `where` on failure."""

    @abstractmethod
    def prompt_tokens(self, messages: list[dict], where: str = "") -> np.ndarray:
        """Token ids of `messages` (ending with a user turn) followed by the assistant's header:
        what a model generates the answer after, tokenized as `encode` tokenizes that part."""


def _pieces_to_tokens(tokenizer: MegatronTokenizer, pieces: list[tuple[str | int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(text or a single token id, mask value) pieces -> concatenated ids and mask."""
    ids: list[int] = []
    mask: list[int] = []
    for piece, target in pieces:
        piece_ids = [piece] if isinstance(piece, int) else (tokenizer.tokenize(piece) if piece else [])
        ids.extend(piece_ids)
        mask.extend([target] * len(piece_ids))
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


# --------------------------------------------------------------------------------- the default template

class DefaultChatTemplate(ChatTemplate):
    """`<|role|>\\n{content}\\n` per prompt message, `<|assistant|>\\n{content}[EOD]` per answer."""

    def __init__(self, tokenizer: MegatronTokenizer) -> None:
        self.tokenizer = tokenizer
        self.with_headers = not isinstance(tokenizer, NullTokenizer)
        self.description = "default" + ("" if self.with_headers else " (no headers: NullTokenizer)")

    def pieces(self, messages: list[dict]) -> list[tuple[str | int, int]]:
        pieces: list[tuple[str | int, int]] = []
        prompt = ""
        for message in messages:
            if message["role"] != "assistant":
                prompt += self._header(message["role"]) + message["content"] + ("\n" if self.with_headers else " ")
                continue
            pieces.append((prompt + self._header("assistant"), 0))
            pieces += [(message["content"], 1), (self.tokenizer.eod, 1)]
            prompt = ""
        if prompt:  # user turns after the last answer: context only
            pieces.append((prompt, 0))
        return pieces

    def _header(self, role: str) -> str:
        return f"<|{role}|>\n" if self.with_headers else ""

    def prompt_tokens(self, messages: list[dict], where: str = "") -> np.ndarray:
        pieces = self.pieces(messages + [{"role": "assistant", "content": "x"}])[:-2]
        return self.encode_pieces(pieces, where)[0]

    def encode_pieces(self, pieces, where: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            return _pieces_to_tokens(self.tokenizer, pieces)
        except ValueError as exc:  # NullTokenizer text that is not integers in range
            raise ValueError(f"{where}: {_first_line(exc)}") from None

    def encode(self, messages: list[dict], where: str = "") -> EncodedConversation:
        return EncodedConversation(*self.encode_pieces(self.pieces(messages), where))


# --------------------------------------------------------------------------------- Jinja templates

def _jinja_environment():
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("chat templates need jinja2 (pip install 'jinja2>=3.1'); or pass --chat-template default") from None

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' own mask;
        # here it renders its body unchanged (the mask comes from the prefixes).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


class JinjaChatTemplate(ChatTemplate):
    """A Hugging Face chat template; `special_tokens` are the named tokens it sees (`bos_token`, ...)."""

    def __init__(self, source: str, tokenizer: MegatronTokenizer, *, origin: str,
                 special_tokens: dict[str, str] | None = None) -> None:
        self.tokenizer, self.origin = tokenizer, origin
        self.special_tokens = dict(special_tokens or {})
        self.description = f"jinja ({origin})"
        environment = _jinja_environment()
        try:
            self._template = environment.from_string(source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            line = getattr(exc, "lineno", None)
            at = f" at line {line}" if line else ""
            raise ValueError(f"{origin}: chat template syntax error{at}: {_first_line(exc)}; fix the template "
                             "or pass --chat-template default") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, where: str = "") -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except Exception as exc:  # raise_exception, undefined attributes, type errors in the template
            raise ValueError(f"{where}: chat template {self.origin} failed: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None

    def prompt_tokens(self, messages: list[dict], where: str = "") -> np.ndarray:
        text = self.render(messages, add_generation_prompt=True, where=where)
        return np.asarray(self.tokenizer.tokenize(text), dtype=np.int64)

    def target_spans(self, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of each assistant turn's target."""
        text = self.render(messages, where=where)
        spans: list[tuple[int, int]] = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True, where=where)
            through = self.render(messages[:k + 1], where=where)
            if not text.startswith(through):
                raise ValueError(
                    f"{where}: chat template {self.origin} renders message {k} differently once later messages "
                    "follow, so its tokens cannot be told apart; use a template whose rendering of earlier turns "
                    "does not change, or --chat-template default")
            # Normally `prompt` is a prefix of `through`; a generation prompt that differs a little from the
            # assistant header the message gets (a stray newline) still leaves their common part.
            before = len(os.path.commonprefix([prompt, through]))
            added = through[before:]
            start = before + _content_offset(added, message["content"])
            end = before + len(added.rstrip())
            if (spans and start < spans[-1][1]) or end <= start:
                raise ValueError(f"{where}: chat template {self.origin} does not render assistant message {k}; "
                                 "check the template or pass --chat-template default")
            spans.append((start, end))
        return text, spans

    def encode(self, messages: list[dict], where: str = "") -> EncodedConversation:
        text, spans = self.target_spans(messages, where)
        pieces: list[tuple[str | int, int]] = []
        position = 0
        for start, end in spans:
            pieces += [(text[position:start], 0), (text[start:end], 1)]
            position = end
        pieces.append((text[position:], 0))
        tokens, mask = _pieces_to_tokens(self.tokenizer, pieces)
        matches = np.array_equal(tokens, self.tokenizer.tokenize(text))
        return EncodedConversation(tokens, mask, matches)


def _content_offset(added: str, content: str) -> int:
    """Where the assistant's content starts in the text its message adds; 0 when the template changed it
    beyond stripping whitespace (then the whole addition is the target)."""
    for candidate in (content, content.strip()):
        offset = added.find(candidate)
        if offset >= 0:
            return offset
    return 0


# --------------------------------------------------------------------------------- finding a template

def load_chat_template(tokenizer: MegatronTokenizer, choice: str = "auto") -> ChatTemplate:
    """`choice`: "auto" (the Hugging Face tokenizer's own template if it has one, else the default),
    "default", or the path of a Jinja file (Hugging Face tokenizers only)."""
    if choice == "default":
        return DefaultChatTemplate(tokenizer)
    if choice == "auto":
        found = find_hf_chat_template(tokenizer) if isinstance(tokenizer, HuggingFaceTokenizer) else None
        if found is None:
            return DefaultChatTemplate(tokenizer)
        source, origin = found
    else:
        path = Path(choice)
        if not path.is_file():
            raise ValueError(f"--chat-template {choice}: no such file; pass a .jinja file, auto or default")
        if not isinstance(tokenizer, HuggingFaceTokenizer):
            raise ValueError("--chat-template FILE needs --tokenizer-type HuggingFaceTokenizer (other tokenizers "
                             "cannot read special tokens from text); use --chat-template default")
        source, origin = _read_text(path), str(path)
    return JinjaChatTemplate(source, tokenizer, origin=origin, special_tokens=hf_special_tokens(tokenizer))


def tokenizer_folder(tokenizer: HuggingFaceTokenizer) -> Path:
    return Path(tokenizer.model_path).parent


def find_hf_chat_template(tokenizer: HuggingFaceTokenizer) -> tuple[str, str] | None:
    """(template, where it came from) beside the tokenizer.json, as transformers looks for it:
    chat_template.jinja first, then tokenizer_config.json's "chat_template"; None when neither."""
    folder = tokenizer_folder(tokenizer)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return _read_text(jinja_file), str(jinja_file)
    config_path = folder / "tokenizer_config.json"
    template = _read_json(config_path).get("chat_template")
    if template is None:
        return None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if "default" not in named:
            raise ValueError(f"{config_path}: several chat templates ({', '.join(map(str, named))}) and none named "
                             "default; pass --chat-template FILE")
        template = named["default"]
    if not isinstance(template, str):
        raise ValueError(f"{config_path}: chat_template is {type(template).__name__}, expected a string")
    return template, str(config_path)


def hf_special_tokens(tokenizer: HuggingFaceTokenizer) -> dict[str, str]:
    """The named special tokens of tokenizer_config.json (special_tokens_map.json fills gaps)."""
    folder = tokenizer_folder(tokenizer)
    tokens: dict[str, str] = {}
    for path in (folder / "special_tokens_map.json", folder / "tokenizer_config.json"):
        for name, value in _read_json(path).items():
            if isinstance(value, dict):  # an AddedToken written as a dict
                value = value.get("content")
            if name in SPECIAL_TOKEN_NAMES and isinstance(value, str):
                tokens[name] = value
    return tokens


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    text = _read_text(path)
    try:
        content = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({_first_line(exc)}); fix or delete it") from None
    return content if isinstance(content, dict) else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
