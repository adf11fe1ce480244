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


def hf_stepwise_logits(model, ids, prefill) -> torch.Tensor:
    """A transformers model with its own cache: the first `prefill` ids in one forward, then one
    token at a time; logits [T, V] (the reference for kvrt's decode)."""
    with torch.no_grad():
        step = model(torch.tensor([ids[:prefill]]), use_cache=True)
        out, cache = [step.logits[0]], step.cache
        for t in ids[prefill:]:
            step = model(torch.tensor([[t]]), cache=cache, use_cache=True)
            out.append(step.logits[0])
            cache = step.cache
    return torch.cat(out)
