"""Write stand-in benchmark files in LongBench v2's and InfiniteBench's published formats, with long
contexts, to time `kvrt eval` on them where the real files cannot be fetched (no hub here).

    python bench/format_files.py OUT_DIR

The records are the tests' fixtures (tests/eval/test_infinitebench.py) with this README appended to
their contexts, and two LongBench v2 questions over slices of it: a run's cost depends on the prompt's
length (cut to --max-length) and the tokens generated, not on what the text says. bench/RESULTS.md
has the command that timed them.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "eval"))

from test_infinitebench import records  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    readme = (ROOT / "README.md").read_text()
    for name, items in records(noise=400).items():
        for item in items:
            if name != "passkey":  # the passkey's noise already runs past 2k tokens
                item["context"] += "\n" + readme[:24000]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    questions = [{"_id": f"q{i}", "domain": "Single-Document QA", "sub_domain": "readme", "difficulty": "easy",
                  "length": "short", "question": "Which command evaluates cache specs side by side?",
                  "choice_A": "kvrt eval", "choice_B": "kvrt chat", "choice_C": "kvrt serve", "choice_D": "kvrt pull",
                  "answer": "A", "context": readme[i * 5000:i * 5000 + 30000]} for i in range(2)]
    (out / "data.json").write_text(json.dumps(questions))
    print(f"wrote {len(list(out.iterdir()))} files to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/format_files.py OUT_DIR")
    main(Path(sys.argv[1]))
