"""Running a tiny model under a cache spec: a prefill, then one decode step per remaining token."""

import torch


def token_ids(n: int, seed: int = 0, vocab: int = 200) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_spec(runtime, spec, ids, prefill, all_logits=True):
    """(logits of every position [or the prefill's last and each decode step], the cache)."""
    cache = runtime.new_cache(spec)
    out = [runtime.forward(ids[:prefill], cache, all_logits=all_logits)]
    out += [runtime.forward([t], cache) for t in ids[prefill:]]
    return torch.cat(out), cache
