"""A prepared sample (prompt ids and gold answers) and the standard prompt setting around it:
the chat template's frame or plain BOS, and middle truncation that reserves the answer's room."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrt.api import truncate_middle
from kvrt.errors import KvrtError


@dataclass
class Sample:
    id: str
    prompt_ids: list[int]
    answers: list[str]
    meta: dict = field(default_factory=dict)


class Frame:
    """The token pieces around the task text: the chat template's (one user turn, then the
    assistant's turn opened), or just BOS."""

    MARK = "\x00kvrt-body\x00"

    def __init__(self, tokenizer, chat: bool):
        if chat:
            if not tokenizer.has_chat_template:
                raise KvrtError("this task uses the chat template, but the model has none")
            text = tokenizer.apply_chat_template([{"role": "user", "content": self.MARK}])
            before, after = text.split(self.MARK)
            self.prefix = tokenizer.encode(before, add_special_tokens=False)
            self.suffix = tokenizer.encode(after, add_special_tokens=False)
        else:
            self.prefix, self.suffix = tokenizer.encode("", add_special_tokens=True), []


def framed_prompt(tokenizer, text: str, chat: bool, max_length: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """Prompt ids for `text` in the standard setting, with the body cut in the middle so that
    prompt + generation fit `max_length`; also whether it was cut."""
    frame = Frame(tokenizer, chat)
    body = tokenizer.encode(text, add_special_tokens=False)
    budget = max_length - max_new_tokens - len(frame.prefix) - len(frame.suffix)
    if budget <= 0:
        raise KvrtError(f"max length {max_length} leaves no room for a prompt after {max_new_tokens} new tokens")
    cut = truncate_middle(body, budget)
    return frame.prefix + cut + frame.suffix, len(cut) < len(body)
