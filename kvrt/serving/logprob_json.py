"""OpenAI's two shapes of `logprobs` in a reply, from kvrt.generation.logprobs' scores.

Completions (the legacy shape lm-eval-harness reads): parallel lists `tokens`, `token_logprobs`,
`top_logprobs` (a dict of token text to logprob per token) and `text_offset` (where each token's
text starts in the reply's `text`); with `echo` the prompt's tokens come first, the very first
one unscored (null). Every sampled token is listed, an end-of-sequence one too: lm-eval's
loglikelihood request asks for one and drops it, whatever it is. Chat: `content`, one object per
token with its text, logprob, UTF-8 bytes and `top_logprobs` as a list of the same objects.
"""

from __future__ import annotations

from kvrt.generation.logprobs import TokenLogprob


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer, scores: list[TokenLogprob], echoed: list[int] | None = None,
                        prompt_scores: list[TokenLogprob] | None = None) -> dict:
    """`echoed`: the prompt's ids when its text leads the reply; `prompt_scores` score them after the first."""
    tokens, logprobs, tops = ([echoed[0]], [None], [None]) if echoed else ([], [], [])
    for s in [*(prompt_scores or []), *scores] if echoed else scores:
        tokens.append(s.token)
        logprobs.append(s.logprob)
        tops.append({token_text(tokenizer, t): lp for t, lp in s.top})
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, scores: list[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [entry(s.token, s.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scores]
    return {"content": content, "refusal": None}
