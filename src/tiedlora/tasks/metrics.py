"""The paper's metrics, each on a 0-100 scale: perfect predictions score 100, empty ones 0."""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal

PUNCTUATION = set(string.punctuation)


def _percent(values) -> float:
    values = list(values)
    return 100 * sum(values) / len(values)


def squad_normalize(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = squad_normalize(prediction).split(), squad_normalize(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: list[str], answers: list[list[str]]) -> dict:
    """Exact match and token F1, each the best over a question's gold answers, as the official script."""
    pairs = list(zip(predictions, answers))
    return {
        "exact_match": _percent(max(squad_normalize(p) == squad_normalize(g) for g in golds) for p, golds in pairs),
        "f1": _percent(max(_f1(p, g) for g in golds) for p, golds in pairs),
    }


def rouge(predictions: list[str], references: list[list[str]]) -> dict:
    """ROUGE-L, -1 and -2 F1 with Porter stemming (rouge-score). With several references a
    prediction gets its best score per measure (rouge-score's score_multi)."""
    from rouge_score import rouge_scorer

    kinds = ("rougeL", "rouge1", "rouge2")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score_multi(refs, p) for p, refs in zip(predictions, references)]
    return {k: _percent(s[k].fmeasure for s in scores) for k in kinds}


def bleu(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU with sacrebleu's defaults (13a tokenizer, exponential smoothing)."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}


def bleu_statistics(predictions: list[str], references: list[str]) -> list[list[float]]:
    """Per row: matched and total n-grams of orders 1-4, then hypothesis and reference length.
    Corpus BLEU is a function of their sums (`bleu_of_statistics`), not a mean of row scores, so
    a bootstrap resamples these instead of re-tokenising every resample."""
    from sacrebleu.metrics import BLEU

    sentence = BLEU(effective_order=True)  # the counts do not depend on it; it only silences a warning
    rows = [sentence.sentence_score(p, [r]) for p, r in zip(predictions, references)]
    return [[*s.counts, *s.totals, s.sys_len, s.ref_len] for s in rows]


def bleu_of_statistics(sums) -> float:
    """Corpus BLEU (as `bleu`) from the summed `bleu_statistics` of its rows."""
    from sacrebleu.metrics import BLEU

    counts = [round(float(x)) for x in sums]  # whole numbers: sums of counts, however they were added
    return BLEU.compute_bleu(counts[0:4], counts[4:8], counts[8], counts[9], smooth_method="exp").score


# A number with an optional sign (not a hyphen inside "10-20"), commas only as thousands
# separators ("1,234" but not "1,2,3"), and an optional decimal part.
NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text: str) -> Decimal | None:
    found = NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "")) if found else None


def gsm8k(predictions: list[str], answers: list[str]) -> dict:
    """Right when the prediction's last number equals the number after the gold's ####
    (compared as numbers: 3.50 == 3.5)."""
    golds = [last_number(a.split("####")[-1]) for a in answers]
    return {"exact_match": _percent(g is not None and last_number(p) == g for p, g in zip(predictions, golds))}


def choice(prediction: str) -> int | None:
    """The HellaSwag ending a generated answer names: its first standalone digit 0-3."""
    found = re.search(r"\b[0-3]\b", prediction)
    return int(found.group()) if found else None


def accuracy(predictions: list[str], labels: list) -> dict:
    return {"accuracy": _percent(choice(p) == int(label) for p, label in zip(predictions, labels))}
