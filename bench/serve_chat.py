"""Multi-turn chat through the engine behind `kvrt serve`, with and without the prompt cache.

C conversations run at once, each a client that sends T turns one after another; every turn
resends the whole conversation (system prompt, a passage of natural text to talk about in the
first user message, every earlier question and reply), as chat clients do. Per cache spec, the
same workload runs with the prompt cache (kvrt.serving.prompt_cache) and without it, in this
process one after the other. Reported: prompt tokens prefilled and reused, time to first token
(median and p90 over the turns after the first; the first turns have nothing to reuse), tokens
generated per second over the whole run, and the wall time.

    taskset -c 0 python bench/serve_chat.py                  # 8 conversations x 6 turns, default model
    python bench/serve_chat.py --conversations 2 --turns 3   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from texts import natural_passages

SPECS = ["full", "snapkv:budget=256+ott:bits=2"]
SYSTEM = "You are a helpful assistant. Answer in a few sentences, using the passage the user gives."
FOLLOW_UPS = ["What is the passage about?", "Name one detail it mentions.", "Why does that detail matter?",
              "Say that again in simpler words.", "Give the passage a title.", "What would you ask its author?",
              "Summarize our talk in one sentence."]


def conversation(engine, tokenizer, passage: str, turns: int, new: int, params) -> list[dict]:
    """One client's turns, each sent once the last reply is in; per turn its numbers."""
    messages = [{"role": "system", "content": SYSTEM}]
    questions = [f"Here is a passage:\n\n{passage}\n\nWhat is its main point?", *FOLLOW_UPS]
    numbers = []
    for turn in range(turns):
        messages.append({"role": "user", "content": questions[turn % len(questions)]})
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        handle = engine.submit(ids, max_tokens=new, params=params)
        reply = handle.text()
        messages.append({"role": "assistant", "content": reply})
        numbers.append({"turn": turn, "prompt": len(ids), "cached": handle.cached_tokens,
                        "generated": handle.completion_tokens, "ttft": handle.first_token_at - handle.submitted})
    return numbers


def run(model, spec: str, passages: list[str], turns: int, new: int, prompt_cache: int, max_batch: int) -> dict:
    from kvrt.generation.sampling import SamplingParams
    from kvrt.serving.engine import Engine

    engine = Engine(model, cache=spec, max_batch=max_batch, prompt_cache=prompt_cache).start()
    results: list[list[dict]] = [[] for _ in passages]

    def client(i: int) -> None:
        results[i] = conversation(engine, model.tokenizer, passages[i], turns, new, SamplingParams(temp=0))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(passages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    engine.stop()
    turns_done = [n for numbers in results for n in numbers]
    later = sorted(n["ttft"] for n in turns_done if n["turn"] > 0)
    return {"prefilled": sum(n["prompt"] - n["cached"] for n in turns_done),
            "reused": sum(n["cached"] for n in turns_done), "generated": sum(n["generated"] for n in turns_done),
            "ttft_p50": statistics.median(later), "ttft_p90": later[round(0.9 * (len(later) - 1))],
            "ttft_first": statistics.median(n["ttft"] for n in turns_done if n["turn"] == 0), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--passage", type=int, default=512, help="tokens of the passage in each first message")
    parser.add_argument("--new", type=int, default=32, help="most tokens per reply")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--specs", default=";".join(SPECS), help="';'-separated cache specs")
    args = parser.parse_args()

    import torch

    import kvrt

    torch.set_num_threads(1)
    model = kvrt.load(args.model, backend=args.backend, dtype="float32")
    passages = [model.tokenizer.decode(ids) for ids in natural_passages(model.tokenizer, args.passage,
                                                                        args.conversations)]
    print(f"## {args.conversations} conversations x {args.turns} turns, each turn resending the conversation "
          f"(first message: a {args.passage}-token passage), replies of at most {args.new} tokens, greedy, "
          f"max batch {args.max_batch}\n")
    print("| spec | prompt cache | prompt tokens prefilled | reused | TTFT first turn p50 s | TTFT later turns "
          "p50 s | p90 s | generated tok/s | wall s | vs no cache |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for spec in args.specs.split(";"):
        without = None
        for cache_bytes in (0, 2**30):
            r = run(model, spec, passages, args.turns, args.new, cache_bytes, args.max_batch)
            without = without or r
            print(f"| `{spec}` | {'on' if cache_bytes else 'off'} | {r['prefilled']} | {r['reused']} | "
                  f"{r['ttft_first']:.2f} | {r['ttft_p50']:.2f} | {r['ttft_p90']:.2f} | "
                  f"{r['generated'] / r['wall']:.1f} | {r['wall']:.1f} | {without['wall'] / r['wall']:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
