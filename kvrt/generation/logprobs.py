"""Token log-probabilities, for OpenAI's `logprobs` (and so for lm-eval-harness's loglikelihood tasks).

They come from the very logits rows sampling reads, under the request's cache spec, before any
sampling transform (temperature, top-k/p, repetition penalty): the model's own next-token
distribution, log-softmaxed in float64 on the host. A prompt's own tokens are scored from its
prefill, where every prompt token attends over the whole uncompressed prompt (kvrt compresses once
the prompt is in, kvrt.cache.kvcache.KVCache.hold), so their logprobs are the same under every
spec; the tokens a request generates are scored after compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP = 20  # the most alternatives a request may ask for per token (OpenAI's chat limit)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the likeliest tokens and their logprobs, likeliest first


def log_softmax(row: np.ndarray) -> np.ndarray:
    x = np.asarray(row, dtype=np.float64)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def score(row: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The logprob of `token` under one logits row, with the `top` likeliest tokens."""
    logprobs = log_softmax(row)
    top = min(top, logprobs.shape[0])
    best = np.argpartition(-logprobs, top - 1)[:top] if top else np.arange(0)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(token, float(logprobs[token]), [(int(i), float(logprobs[i])) for i in best])


def score_rows(rows: np.ndarray, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Row i scores tokens[i] (a prompt chunk's logits and the tokens that follow each position)."""
    return [score(row, token, top) for row, token in zip(rows, tokens)]
