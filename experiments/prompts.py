"""Summarization prompts: the tokenizer's chat template when it has one, else TRT-LLM's ``article + " TL;DR: "``.

Only the article is ever truncated: the instruction and the template's special tokens always survive, so a
long paper cannot silently turn into "continue this text" (TRT-LLM's summarize.py truncates the whole
string, which can cut its own " TL;DR: ").
"""
from __future__ import annotations

from quant.errors import UserError

INSTRUCTION = "Summarize the following text in a few sentences."
_SLOT = "\u0000ARTICLE\u0000"


class PromptBuilder:
    def __init__(self, tokenizer, max_input_len: int):
        self.tokenizer = tokenizer
        self.max_input_len = max_input_len
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if self.uses_chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{INSTRUCTION}\n\n{_SLOT}"}], tokenize=False, add_generation_prompt=True
            )
            prefix, suffix = text.split(_SLOT)
            self.prefix = self._ids(prefix)
            self.suffix = self._ids(suffix)
        else:
            bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
            self.prefix, self.suffix = bos, self._ids(" TL;DR: ")
        overhead = len(self.prefix) + len(self.suffix)
        if overhead >= max_input_len:
            raise UserError(f"--max-input-len {max_input_len} leaves no room for the article "
                            f"(the prompt template alone takes {overhead} tokens)")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, article: str) -> list[int]:
        budget = self.max_input_len - len(self.prefix) - len(self.suffix)
        return self.prefix + self._ids(article)[:budget] + self.suffix

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
