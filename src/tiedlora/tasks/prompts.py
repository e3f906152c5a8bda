"""Every prompt the harness shows a model, and how a (prompt, answer) pair becomes tokens.

docs/tasks.md quotes the templates verbatim (a test checks). A template is filled with the row's
own fields. Plain (the default): the answer follows the prompt after one space. `chat=True`: the
filled prompt is the user turn of the tokenizer's chat template and the answer is the assistant
turn. Either way the answer ends with EOS, where greedy decoding stops, as in the paper.
"""

from __future__ import annotations

from ..tokens import prompt_ids

TEMPLATES = {
    "squad": "Answer the question with a short span copied from the context.\n\nContext: "
    "{context}\n\nQuestion: {question}\nAnswer:",
    "dialogsum": "Summarize the dialogue in a few sentences.\n\n{dialogue}\n\nSummary:",
    "hellaswag": (
        "Which ending continues the text best? Reply with its number only.\n\n{activity_label}: {ctx}\n"
        "0: {endings[0]}\n1: {endings[1]}\n2: {endings[2]}\n3: {endings[3]}\nAnswer:"
    ),
    "iwslt2017-de-en": "Translate the German text into English.\n\nGerman: {de}\nEnglish:",
    "gsm8k": "Solve the math problem step by step, then give the final number after ####.\n\nQuestion: "
    "{question}\nAnswer:",
}
# HellaSwag's log-likelihood scorer reads each ending, after a space, as a continuation of this
# text, as lm-evaluation-harness does; no instruction, no list of endings.
CHOICE_CONTEXT = "{activity_label}: {ctx}"


def encode(tokenizer, prompt: str, target: str, chat: bool = False) -> dict[str, list[int]]:
    """input_ids and labels of one training example: labels are -100 over the prompt, so the loss
    is on the answer and its EOS only."""
    context = prompt_ids(tokenizer, prompt, chat)
    answer = tokenizer(target if chat else " " + target, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    return {"input_ids": context + answer, "labels": [-100] * len(context) + answer}
