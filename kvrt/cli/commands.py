"""The `kvrt` command line: generate, chat, pull, models.

Every failure a user can cause ends as one `error: ...` line on stderr and a non-zero
exit, never a traceback (set KVRT_DEBUG=1 to see one for a real bug): 2 for a bad value
or usage (as click does), 1 for anything else that failed, 130 for Ctrl-C. Long work
(downloads, prefill, eval) shows its progress on stderr.
"""

from __future__ import annotations

import json
import os
import sys

import click

from kvrt import __version__
from kvrt.cli.cache_flags import cache_options
from kvrt.errors import InvalidValue, KvrtError
from kvrt.models.progress import Progress
from kvrt.generation.sampling import SamplingParams


def log(message: str) -> None:
    click.echo(f"kvrt: {message}", err=True)


class OneLineErrors(click.Group):
    """A click group whose usage errors, kvrt errors and Ctrl-C all end as one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except KvrtError as exc:
            fail(str(exc), exc.exit_code)
        except (KeyboardInterrupt, click.Abort):
            fail("interrupted", 130)
        except Exception as exc:  # a bug, not bad input: still one line unless debugging
            if os.environ.get("KVRT_DEBUG"):
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (KVRT_DEBUG=1 shows the traceback)", 1)
        sys.exit(0)


def fail(message: str, code: int):
    click.echo(f"error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(code)


@click.group(cls=OneLineErrors)
@click.version_option(__version__, prog_name="kvrt")
def cli():
    """kvrt: a KV-cache runtime for LLM inference."""


def model_options(f):
    f = click.option("--model", "-m", default="default", show_default=True,
                     help="Model folder, .gguf file, 'default' (SmolLM2-135M-Instruct) or hub id.")(f)
    f = click.option("--backend", type=click.Choice(["auto", "torch", "mlx"]), default="auto", show_default=True)(f)
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Compute dtype (default: float32 on CPU, bfloat16 on GPU).")(f)
    return f


def sampling_options(f):
    options = [
        click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--temp", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off."),
        click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--verbose", "-v", is_flag=True, help="Print a stats line to stderr."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampling_params(temp, top_p, top_k, min_p, repetition_penalty, seed) -> SamplingParams:
    return SamplingParams(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed)


def load_model(model, backend, dtype):
    from kvrt.api import load

    return load(model, backend=backend, dtype=dtype, log=log)


@cli.command()
@model_options
@click.option("--prompt", "-p", required=True, help="The prompt; '-' reads it from stdin.")
@click.option("--system-prompt", default=None)
@click.option("--ignore-chat-template", is_flag=True, help="Feed the prompt as raw text.")
@click.option("--truncate", is_flag=True, help="Cut the middle of a prompt that exceeds the context.")
@sampling_options
@cache_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the text and stats.")
def generate(model, backend, dtype, prompt, system_prompt, ignore_chat_template, truncate, max_tokens, temp, top_p,
             top_k, min_p, repetition_penalty, seed, stop, verbose, cache_spec, as_json):
    """Generate a completion for one prompt, streaming it to stdout."""
    prompt = read_stdin() if prompt == "-" else prompt
    params = sampling_params(temp, top_p, top_k, min_p, repetition_penalty, seed)
    m = load_model(model, backend, dtype)
    with PrefillProgress() as progress:
        stream = m.stream(prompt, max_tokens=max_tokens, system_prompt=system_prompt,
                          chat_template=not ignore_chat_template, cache=cache_spec, stop=stop, truncate=truncate,
                          params=params, progress=progress)
        stats = stream.stats
        progress.label = f"prefill of {stats.prompt_tokens} tokens"
        if stats.truncated_tokens:
            log(f"--truncate removed {stats.truncated_tokens} tokens from the middle of the prompt to fit the "
                f"model's context of {m.context_length} with {max_tokens} to generate")
        text, interrupted = emit(stream, echo=not as_json, before=progress.close)
    if interrupted:
        stats.finish_reason = "interrupted"
    if as_json:
        click.echo(json.dumps({"text": text, **stats.as_dict(), "backend": m.backend, "cache": cache_spec}))
    elif verbose:
        click.echo(stats.line(), err=True)
    if interrupted:
        sys.exit(130)


def read_stdin() -> str:
    """All of stdin as text; bytes that are not UTF-8 are one clear error."""
    data = sys.stdin.buffer.read()
    return decoded(data, "the prompt on stdin")


def decoded(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidValue(f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


class PrefillProgress(Progress):
    """A prompt's way through the model's layers on stderr (quiet for short prompts): pass it as a
    generation's `progress`, close it before the reply is printed."""

    def __init__(self):
        super().__init__("prefill", 0, "layers")

    def __call__(self, done: int, layers: int) -> None:
        self.update(done, total=layers)


def emit(pieces, echo: bool, before=lambda: None) -> tuple[str, bool]:
    """Stream text pieces to stdout (if echo); Ctrl-C stops cleanly, keeping the text so far.
    `before` runs as the first piece arrives (it ends a progress line)."""
    text = []
    try:
        for piece in pieces:
            if not text:
                before()
            text.append(piece)
            if echo:
                click.echo(piece, nl=False)
                sys.stdout.flush()
    except KeyboardInterrupt:
        if echo:
            click.echo("")
        return "".join(text), True
    if echo:
        click.echo("")
    return "".join(text), False


@cli.command()
@model_options
@click.option("--system-prompt", default=None)
@click.option("--overflow", type=click.Choice(["drop", "stop"]), default="drop", show_default=True,
              help="When a turn would not fit the model's context: drop the oldest turns, or stop with an error.")
@sampling_options
@cache_options
def chat(model, backend, dtype, system_prompt, overflow, max_tokens, temp, top_p, top_k, min_p, repetition_penalty,
         seed, stop, verbose, cache_spec):
    """Chat in a REPL that keeps the KV cache across turns. /reset clears it, /quit leaves."""
    params = sampling_params(temp, top_p, top_k, min_p, repetition_penalty, seed)
    m = load_model(model, backend, dtype)
    session = m.chat_session(system_prompt, cache=cache_spec, overflow=overflow)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo("kvrt chat: /reset clears the conversation, /quit leaves.", err=True)
    while True:
        if interactive:
            click.echo(">> ", nl=False, err=True)
        raw = sys.stdin.buffer.readline()
        if not raw:
            break
        try:
            line = decoded(raw, "this line").strip()
            if line in ("/quit", "/exit", "/q"):
                break
            if line == "/reset":
                session.reset()
                click.echo("kvrt: conversation reset", err=True)
                continue
            if line:
                interrupted = chat_turn(session, line, params, max_tokens, stop, verbose)
                if interrupted and not interactive:
                    sys.exit(130)
        except KvrtError as exc:
            if not interactive:
                raise
            click.echo(f"error: {exc}", err=True)  # the turn was refused; the conversation goes on


def chat_turn(session, line: str, params, max_tokens: int, stop, verbose: bool) -> bool:
    """One user line and the streamed reply; True when Ctrl-C cut the reply short."""
    with PrefillProgress() as progress:
        stream = session.send(line, max_tokens=max_tokens, stop=stop, params=params, progress=progress)
        if stream.stats.dropped_turns:
            log(f"dropped the {stream.stats.dropped_turns} oldest turn(s) to fit the model's context of "
                f"{session.context_length} tokens with {max_tokens} to generate")
        _, interrupted = emit(stream, echo=True, before=progress.close)
    if verbose:
        click.echo(stream.stats.line(), err=True)
    return interrupted


@cli.command("eval")
@model_options
@click.option("--suite", default="lite", show_default=True,
              help="Task suite: lite, standard (a few tasks of each benchmark, 1k/2k), ruler, longbench, "
                   "infinitebench.")
@click.option("--benchmark", "benchmarks", default=None,
              help="Comma-separated benchmarks instead of a suite: ruler, niah, counting_stars, babilong, "
                   "longbench, longbench_v2, infinitebench, lite (README: Evaluation).")
@click.option("--tasks", default=None, help="Comma-separated tasks instead of a suite.")
@click.option("--cache", "caches", multiple=True, help="Cache spec to evaluate (repeatable) [full].")
@click.option("--lengths", default=None, help="Synthetic prompt lengths in tokens, comma-separated; 1k is 1024 "
                                              "[512,1024].")
@click.option("--limit", type=click.IntRange(min=1), default=5, show_default=True, help="Samples per task and length.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-length", type=click.IntRange(min=16), default=None,
              help="Prompts read from files (LongBench, InfiniteBench, ...) are cut in the middle to this, "
                   "answer included [model context].")
@click.option("--haystack", multiple=True, help="Text file(s) to build haystacks from (default: kvrt's sentences).")
@click.option("--data", "data_dir", default=None,
              help="Folder of the benchmarks' own files by their published names (e.g. hotpotqa.jsonl, data.json); "
                   "without it LongBench, LongBench v2 and InfiniteBench come from the Hugging Face hub (cached).")
@click.option("--out", required=True, help="Run folder; rerunning the same command resumes it.")
@click.option("--overwrite", is_flag=True, help="Replace a run folder made with other settings.")
@click.option("--ray", "ray_address", default=None,
              help="Shard over Ray: a cluster ADDRESS, 'auto' (the running cluster) or 'local' (start one).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Ray workers (one model each); with --server, the requests in flight.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples of a task decoded together (greedy predictions are the same as --batch 1's).")
@click.option("--server", default=None,
              help="Generate on this OpenAI-compatible server (its base URL) instead of here; --model names the "
                   "tokenizer to build prompts with, --workers the requests in flight, and each --cache travels "
                   "per request (kvrt serve applies it; other servers ignore it).")
@click.option("--api-key", default=None, envvar="OPENAI_API_KEY", help="The server's key (Authorization: Bearer).")
def eval_command(model, backend, dtype, suite, benchmarks, tasks, caches, lengths, limit, seed, max_length, haystack,
                 data_dir, out, overwrite, ray_address, workers, batch, server, api_key):
    """Evaluate cache specs side by side on long-context tasks (resumable)."""
    from pathlib import Path

    from kvrt.cli.cache_flags import cache_spec_from
    from kvrt.eval.benchmarks import benchmark_tasks, parse_lengths
    from kvrt.eval.runner import Settings, counted, run_eval
    from kvrt.eval.tasks import LITE_LENGTHS, SUITE_LENGTHS, resolve

    if benchmarks and tasks:
        raise click.UsageError("--benchmark and --tasks both choose the tasks; pick one")
    chosen = resolve(",".join(benchmark_tasks(benchmarks)) if benchmarks else tasks, None if tasks else suite)
    sizes = parse_lengths(lengths) if lengths else SUITE_LENGTHS.get(suite, LITE_LENGTHS)
    specs = [cache_spec_from(c) for c in caches] or ["full"]
    settings = Settings(model=model, caches=specs, tasks=[t.name for t in chosen], lengths=sizes, limit=limit,
                        seed=seed, backend=backend, dtype=dtype, max_length=max_length, haystack=list(haystack),
                        data_dir=data_dir, server=server)
    if server and ray_address:
        raise click.UsageError("--server and --ray are two ways to run the samples; pick one")
    m = remote_model(model, server, api_key) if server else load_model(model, backend, dtype)
    summary = run_eval(m, settings, Path(out), overwrite=overwrite, progress=True, report=log,
                       ray_address=ray_address, workers=workers, batch=batch)
    log(f"{counted(summary['written'], 'sample')} written over {counted(summary['cells'], 'cell')} into {out}")
    report_run(out)


def remote_model(model: str, server: str, api_key: str | None):
    """kvrt eval --server's model: the server, with the named model's tokenizer and context to build prompts."""
    from kvrt.eval.remote import RemoteModel
    from kvrt.models.config import context_length, read_config
    from kvrt.models.store import resolve_model
    from kvrt.models.tokenizer import Tokenizer

    folder = resolve_model(model, log=log)
    return RemoteModel(server, Tokenizer.from_folder(folder), context_length(read_config(folder)), api_key)


@cli.command()
@click.argument("run")
def report(run):
    """Tables (report.md, results.json, results.csv) and plots from an eval run folder."""
    report_run(run)


def report_run(run: str) -> None:
    from pathlib import Path

    from kvrt.eval.report import write_report

    summary = write_report(Path(run))
    click.echo((Path(run) / "report.md").read_text().split("## By length")[0].rstrip())
    plots = ", ".join(summary["plots"]) or "none (install matplotlib: pip install 'kvrt[eval]')"
    log(f"report: {Path(run) / 'report.md'}; plots: {plots}")


@cli.command()
@click.argument("name")
def pull(name):
    """Fetch (and convert) a model into kvrt's model cache."""
    from kvrt.models.store import pull as pull_model

    folder = pull_model(name, log=log)
    click.echo(str(folder))


@cli.command()
def models():
    """List the models in kvrt's model cache: size on disk, GGUF weight types, what each backend runs."""
    from kvrt.models.store import kvrt_home, list_models

    entries = list_models()
    if not entries:
        click.echo(f"no models cached under {kvrt_home()} (try: kvrt pull default)")
    for entry in entries:
        click.echo(f"{entry['name']:<40} {entry['bytes'] / 2**20:>9.1f} MiB  {entry['path']}")
        if entry.get("gguf"):
            click.echo(f"    GGUF weights: {entry['gguf']}")
        click.echo(f"    torch: {entry['torch']}; mlx: {entry['mlx']}")


@cli.command()
@model_options
@cache_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests prefilled or decoded at once.")
@click.option("--kv-memory", default=None,
              help="KV cache budget for admission: bytes or a size like 512MiB, 2GiB, 1.5GB, 300M [no limit].")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for admission; beyond them a request gets HTTP 429.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt tokens prefilled per engine step (running decodes wait at most one chunk).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens generated for a request that names no max_tokens.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model replicas behind Ray Serve (each with its own engine and --kv-memory).")
@click.option("--api-key", "api_keys", multiple=True, envvar="KVRT_API_KEY", show_envvar=True,
              help="A key clients must send as 'Authorization: Bearer KEY' on /v1 and /metrics (repeatable; "
                   "the variable takes several separated by spaces) [none: open].")
@click.option("--metrics-public", is_flag=True, help="Serve /metrics without a key.")
@click.option("--max-request-bytes", default="8MiB", show_default=True,
              help="The largest request body; a larger one gets HTTP 413 before it is read whole.")
@click.option("--prompt-cache", "prompt_cache", default="1GiB", show_default=True,
              help="Bytes of finished requests' KV caches kept for later requests that start the same way "
                   "(chat turns); counted in --kv-memory; 0: off.")
def serve(model, backend, dtype, cache_spec, host, port, max_batch, kv_memory, max_queue, prefill_chunk, max_tokens,
          replicas, api_keys, metrics_public, max_request_bytes, prompt_cache):
    """Serve the model over an OpenAI-compatible HTTP API, with continuous batching."""
    from kvrt.serving.keys import ApiKeys, exposure_warning

    budget = parse_size(kv_memory, "--kv-memory") if kv_memory is not None else None
    keys = ApiKeys(api_keys, metrics_public)
    body_limit = parse_size(max_request_bytes, "--max-request-bytes")
    engine = dict(cache=cache_spec, max_batch=max_batch, kv_memory=budget, max_queue=max_queue,
                  prefill_chunk=prefill_chunk, prompt_cache=cache_bytes(prompt_cache))
    warning = exposure_warning(host, keys)
    if warning:
        log(warning)
    if replicas > 1:
        from kvrt.serving.replicas import serve_replicas
        from kvrt.cache.spec import CacheSpec

        CacheSpec.parse(cache_spec)  # a bad spec is one line here, not an error in every replica
        serve_replicas(model, backend, dtype, engine, host, port, replicas, max_tokens, log, keys, body_limit)
        log("stopped")
        return
    try:
        from kvrt.serving.http import bind, build_app, serve as run_server
    except ImportError as exc:
        raise KvrtError(f"kvrt serve needs fastapi and uvicorn ({exc}): pip install 'kvrt[serve]'") from None
    from kvrt.serving.engine import Engine

    sock = bind(host, port)
    try:
        m = load_model(model, backend, dtype)
        running = Engine(m, **engine).start()
    except BaseException:
        sock.close()
        raise
    app = build_app(m, running, name=model, max_tokens=max_tokens, keys=keys, max_request_bytes=body_limit)
    bound_host, bound_port = sock.getsockname()[:2]
    kv = "no KV memory limit" if budget is None else f"KV memory {human_size(budget)}"
    log(f"serving '{model}' ({m.backend}, cache {cache_spec}) on http://{bound_host}:{bound_port}/v1; "
        f"{kv}, max batch {max_batch}, queue {max_queue}, prompt cache "
        f"{human_size(engine['prompt_cache']) if engine['prompt_cache'] else 'off'}"
        + (f", {len(api_keys)} API key(s)" if keys else ""))
    run_server(app, sock, running)
    log("stopped")


SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30,
              "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from '1048576', '512MiB', '2GiB', '1.5GB' or '300M' (K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match and SIZE_UNITS.get(match.group(2).lower())
    if not unit or int(float(match.group(1)) * unit) < 1:
        raise InvalidValue(f"{what} takes a positive size in bytes or with a unit (512MiB, 2GiB, 1.5GB, 300M), "
                           f"got '{text}'")
    return int(float(match.group(1)) * unit)


def cache_bytes(text: str) -> int:
    """--prompt-cache: a size, or 0 / off for none."""
    return 0 if text.strip().lower() in ("0", "off") else parse_size(text, "--prompt-cache")


def human_size(n: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} bytes"


def main():
    cli()

