"""lm-eval-harness itself against `kvrt serve`: its `local-completions` model on two small local tasks
(no hub), one loglikelihood and one generate-until. Every score it reports must be what the model
gives in this process: the loglikelihood of each continuation from the model's own log-softmax, and
each generation the model's greedy text up to the task's stop strings. lm-eval tokenizes through
the server's /tokenize and /tokenizer_info (vLLM's routes), so it needs no tokenizer of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
from test_serve import start  # noqa: E402  (the same server harness)

LOGLIKELIHOOD = [("The capital of France is", " Paris"), ("One, two, three,", " four"),
                 ("The opposite of hot is", " cold")]
QUESTIONS = ["What is the capital of France?", "What is two plus two?", "Name a color of the sky."]

TASKS = {
    "kvrt_ll": """task: kvrt_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "kvrt_gen": """task: kvrt_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 12
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def write_tasks(folder) -> None:
    rows = {"kvrt_ll": [{"context": c, "continuation": t} for c, t in LOGLIKELIHOOD],
            "kvrt_gen": [{"question": q, "answer": "x"} for q in QUESTIONS]}
    for name, template in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows[name]))
        (folder / f"{name}.yaml").write_text(template.format(data=data))


def samples(out_dir, task: str) -> list[dict]:
    (path,) = out_dir.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.mark.model
@pytest.mark.slow
def test_lm_eval_harness_scores_through_kvrt_serve(default_model_dir, tmp_path_factory, tmp_path):
    import kvrt
    from kvrt.generation.logprobs import log_softmax

    server = start(default_model_dir, tmp_path_factory, "lm-eval")
    try:
        write_tasks(tmp_path)
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "OPENAI_API_KEY": "unused"}
        run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                              f"base_url={server.url}/v1/completions,model=default", "--tasks", "kvrt_ll,kvrt_gen",
                              "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
                              "--log_samples"], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        assert server.stop() == 0

    model = kvrt.load(str(default_model_dir), backend="torch")
    encode = model.tokenizer.encode
    for sample, (context, continuation) in zip(samples(tmp_path / "out", "kvrt_ll"), LOGLIKELIHOOD):
        ids, ctx = encode(context + continuation, add_special_tokens=False), encode(context, add_special_tokens=False)
        logits = model.runtime.forward(ids, model.runtime.new_cache("full"), all_logits=True)
        rows = np.stack([log_softmax(r) for r in model.runtime.ops.to_numpy(logits)])
        wanted = sum(rows[i - 1, ids[i]] for i in range(len(ctx), len(ids)))
        greedy = all(rows[i - 1].argmax() == ids[i] for i in range(len(ctx), len(ids)))
        logprob, is_greedy = sample["resps"][0][0]
        assert float(logprob) == pytest.approx(wanted, abs=2e-3) and (is_greedy == "True") == greedy
    for sample, question in zip(samples(tmp_path / "out", "kvrt_gen"), QUESTIONS):
        expected = model.generate(f"Q: {question}\nA:", chat_template=False, max_tokens=12, temp=0,
                                  stop=["\n", "Q:", model.tokenizer.eos_token]).text
        assert sample["resps"][0][0] == expected
