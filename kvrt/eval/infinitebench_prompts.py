"""InfiniteBench's published prompt templates for the eight English tasks kvrt runs (Zhang et al. 2024,
arXiv 2402.13718; github.com/OpenBMB/InfiniteBench, src/prompt.py, `yarn_mistral_templates`): the ones the
repository's open-model scripts (eval_yarn_mistral.py, eval_yi_200k.py, eval_chatglm.py) fill as plain text,
most ending in an answer prefix. Kept as published, keys included (the data names), so that scores compare
with its tables; kvrt.eval.infinitebench fills them as src/eval_utils.py's create_prompt does.
"""

TEMPLATES = {
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is"
    ),
    "number_string": (
        "There is an important info hidden inside a lot of irrelevant text. Find it. "
        "I will quiz you about the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is"
    ),
    "kv_retrieval": (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}"
    ),
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "longbook_choice_eng": (
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\nB. {OPTION_B}\n"
        "C. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is"
    ),
    "longbook_qa_eng": (
        "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
        "Question: {question}\nAnswer:"
    ),
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "code_debug": (
        "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes "
        "it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\n"
        "The correct option is:"
    ),
}
