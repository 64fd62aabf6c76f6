"""Instruction-tuning records -> conversations: lists of {"role", "content"} messages.

Four record layouts, told apart by their fields (the default field names, each changeable by a flag):

  prompt-response  {"prompt", "response"}                      optional "system"
  alpaca           {"instruction", "output"}, optional "input"  (user text: instruction, blank line, input)
  chat             {"messages": [{"role", "content"}, ...]}
  sharegpt         {"conversations": [{"from", "value"}, ...]}

Roles are `system`, `user` (or ShareGPT's `human`) and `assistant` (or `gpt`), in either list layout.
A conversation is an optional system message, then turns alternating user, assistant, starting
with a user turn, with at least one assistant turn; every assistant turn has non-blank text. Any
other record is a ValueError whose one line names the record (`FILE:LINE`, `FILE row N`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, fields as dataclass_fields

FORMATS = ("prompt-response", "alpaca", "chat", "sharegpt")
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# Field names per format; `FieldNames` overrides any of them.
_DEFAULT_KEYS = {
    "prompt-response": {"prompt": "prompt", "response": "response"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "chat": {"messages": "messages", "role": "role", "content": "content"},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value"},
}
_REQUIRED = {"prompt-response": ("prompt", "response"), "alpaca": ("instruction", "output"),
             "chat": ("messages",), "sharegpt": ("messages",)}
_FLAG_OF_FORMAT = {"prompt-response": "--prompt-key / --response-key", "alpaca": "--instruction-key / --output-key",
                   "chat": "--messages-key", "sharegpt": "--messages-key"}

Message = dict  # {"role": str, "content": str}


@dataclass(frozen=True, kw_only=True)
class FieldNames:
    """Record field names that differ from the formats' defaults (None: the format's default).

    `messages`, `role` and `content` serve both list layouts (chat and ShareGPT); `system` names
    an optional top-level system prompt in every layout.
    """

    prompt: str | None = None
    response: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    messages: str | None = None
    role: str | None = None
    content: str | None = None
    system: str = "system"

    def __post_init__(self) -> None:
        for field in dataclass_fields(self):
            value = getattr(self, field.name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"--{field.name}-key must be a non-empty field name")

    def key(self, fmt: str, name: str) -> str:
        override = getattr(self, name)
        return override if override is not None else _DEFAULT_KEYS[fmt][name]


def detect_format(record: dict, field_names: FieldNames, where: str) -> str:
    """The layout of `record`, from which fields it has (see the module docstring)."""
    list_formats = [fmt for fmt in ("chat", "sharegpt") if field_names.key(fmt, "messages") in record]
    if len(list_formats) == 2:  # one --messages-key for both: the first message's fields decide
        messages = record[field_names.key("chat", "messages")]
        first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else {}
        is_sharegpt = field_names.key("sharegpt", "role") in first and field_names.key("chat", "role") not in first
        return "sharegpt" if is_sharegpt else "chat"
    if list_formats:
        return list_formats[0]
    for fmt in ("alpaca", "prompt-response"):
        if all(field_names.key(fmt, name) in record for name in _REQUIRED[fmt]):
            return fmt
    found = ", ".join(sorted(map(str, record))) or "none"
    raise ValueError(
        f"{where}: cannot tell the SFT format from the fields ({found}); expected messages (chat), "
        "conversations (sharegpt), instruction + output (alpaca) or prompt + response; "
        "pass --sft-format and the --*-key flags that name your fields"
    )


def to_conversation(record: dict, fmt: str, field_names: FieldNames, where: str) -> list[Message]:
    """The checked conversation of `record` in layout `fmt` (one of FORMATS)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown SFT format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with fields, found {type(record).__name__}")
    if fmt == "prompt-response":
        messages = [_message("user", _text(record, fmt, "prompt", field_names, where)),
                    _message("assistant", _text(record, fmt, "response", field_names, where))]
    elif fmt == "alpaca":
        instruction = _text(record, fmt, "instruction", field_names, where)
        extra = _text(record, fmt, "input", field_names, where, optional=True)
        messages = [_message("user", "\n\n".join(part for part in (instruction, extra) if part)),
                    _message("assistant", _text(record, fmt, "output", field_names, where))]
    else:
        messages = _message_list(record, fmt, field_names, where)
    system = _optional_system(record, field_names, where)
    if system:
        if messages and messages[0]["role"] == "system":
            raise ValueError(f"{where}: both a {field_names.system!r} field and a system message; keep one")
        messages.insert(0, _message("system", system))
    check_conversation(messages, where, _list_name(fmt, field_names))
    return messages


def check_conversation(messages: list[Message], where: str, name: str = "messages") -> None:
    """Raise a ValueError naming the record unless `messages` is a trainable conversation."""
    if not messages:
        raise ValueError(f"{where}: {name} is empty; a sample needs a user and an assistant turn")
    first_turn = 1 if messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages):
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if index >= first_turn and message["role"] != expected:
            raise ValueError(
                f"{where}: {name}[{index}] has role {message['role']!r} where {expected!r} must come; "
                "after an optional system message, turns alternate user, assistant, starting with user"
            )
        if message["role"] == "assistant" and not message["content"].strip():
            raise ValueError(f"{where}: {name}[{index}] is an empty assistant response; remove the sample or fill it")
    if len(messages) <= first_turn + 1:
        raise ValueError(f"{where}: no assistant turn; a sample needs at least one response to learn from")


def _message(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def _list_name(fmt: str, field_names: FieldNames) -> str:
    if fmt in ("chat", "sharegpt"):
        return field_names.key(fmt, "messages")
    return "the conversation"


def _text(record: dict, fmt: str, name: str, field_names: FieldNames, where: str, optional: bool = False) -> str:
    key = field_names.key(fmt, name)
    value = record.get(key)
    if value is None:  # Parquet and datasets fill a field missing from some rows with None
        if optional:
            return ""
        found = ", ".join(sorted(map(str, record))) or "none"
        raise ValueError(f"{where}: no field {key!r} (fields: {found}); pass --{name}-key with the right name "
                         f"or --sft-format")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} is {type(value).__name__}, expected a string")
    if name in ("response", "output") and not value.strip():
        raise ValueError(f"{where}: {key!r} is an empty response; remove the sample or fill it")
    return value


def _optional_system(record: dict, field_names: FieldNames, where: str) -> str:
    value = record.get(field_names.system)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: {field_names.system!r} is {type(value).__name__}, expected a string")
    return value or ""


def _message_list(record: dict, fmt: str, field_names: FieldNames, where: str) -> list[Message]:
    list_key = field_names.key(fmt, "messages")
    if record.get(list_key) is None:
        found = ", ".join(sorted(map(str, record))) or "none"
        raise ValueError(f"{where}: no field {list_key!r} (fields: {found}); pass {_FLAG_OF_FORMAT[fmt]} "
                         "with the right name or --sft-format")
    items = record[list_key]
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{where}: {list_key!r} is {type(items).__name__}, expected a list of messages")
    role_key, content_key = field_names.key(fmt, "role"), field_names.key(fmt, "content")
    messages = []
    for index, item in enumerate(items):
        name = f"{list_key}[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: {name} is {type(item).__name__}, expected an object with "
                             f"{role_key!r} and {content_key!r}")
        for key in (role_key, content_key):
            if item.get(key) is None:
                found = ", ".join(sorted(map(str, item))) or "none"
                raise ValueError(f"{where}: {name} has no {key!r} (fields: {found}); pass --role-key / "
                                 "--content-key with the right names")
        role, content = item[role_key], item[content_key]
        if not isinstance(content, str):
            raise ValueError(f"{where}: {name}.{content_key} is {type(content).__name__}, expected a string")
        if not isinstance(role, str) or role not in _ROLE_ALIASES:
            raise ValueError(f"{where}: {name} has role {role!r}; SFT takes system, user (human) and "
                             "assistant (gpt) messages")
        messages.append(_message(_ROLE_ALIASES[role], content))
    return messages
