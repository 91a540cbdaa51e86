"""Answer scoring for the multi-turn benchmarks.

Rules followed (docs/design.md §3.5):

* **VQA-v2**: the *official* evaluation of GT-Vision-Lab/VQA (``PythonEvaluationTools/vqaEvaluation/vqaEval.py``),
  reproduced rule by rule, in two versions, named by the scorer (docs/design.md §3.5):

  - ``vqa_v2`` (:func:`vqa_accuracy`, the default for VQA-v2 dialogues): the official file as it is since its
    2021 fix ("Fixed processing answers bug"). The prediction and every reference get ``\\n``/``\\t`` -> space and
    ``strip()``. Then, only when the references are not all identical, the references *and* the prediction get
    :func:`process_punctuation` followed by :func:`process_digit_article`. When all references agree, nothing more
    is done to either side ("Orange" against ten "orange" scores 0).
  - ``vqa_v2_2016`` (:func:`vqa_accuracy_2016`): the file from 2016 to 2021, which earlier papers used. The prediction
    always gets whitespace, :func:`process_punctuation`, then :func:`process_digit_article`; the references get
    **only** :func:`process_punctuation`, and only when they are not all identical.
  - Both: score = mean over the references i of ``min(1, #{j != i : ref_j == prediction} / 3)`` (leave-one-out).

  The punctuation set is the official one, ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` (no ``:`` and no ``'``).
  (LLaVA's EvalAI processor and lmms-eval use variants. We do not follow them.) The official code passes
  ``re.UNICODE`` (32) as the *count* argument of the period-stripping ``sub``, so at most 32 periods are removed. We
  keep that behaviour too.
* **GQA and MT-Shapes** (:func:`exact_match`): both the prediction and each reference go through the same VQA
  normalisation (punctuation, lower case, number words -> digits, articles dropped, contractions). Then the two
  strings are compared for equality. The official GQA ``eval.py`` compares raw strings. LLaVA first applies
  ``rstrip('.').lower()`` to the prediction, and lmms-eval ignores case and punctuation. On GQA's single-word
  references our rule gives the lmms-eval result.
* **Per turn** (:func:`per_turn_accuracy`): Acc_t is the mean score of turn t over the dialogues that have a turn t.
  Avg is the mean of Acc_1..Acc_T. Both are reported in percent, as the official evaluator reports.
* **Two methods compared** (:func:`paired_avg_difference`): the difference of their Avg over the same dialogues, with
  its standard error from the per-dialogue spread (the dialogues are the independent draws).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# The official tables (GT-Vision-Lab/VQA vqaEval.py). The keys are the forms without an apostrophe.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Copied in meaning from the official code: "(?!<=\d)" is a look-*ahead* that is always true before a ".", so the
# pattern removes every period that is not followed by a digit ("2.5" is kept, "yes." loses its period).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_COUNT = re.UNICODE  # the official code passes this flag (== 32) as sub()'s count


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``. A punctuation mark is deleted where the text has it next to a space, or
    where the text contains a digit-comma-digit. Everywhere else it becomes a space. Then periods that are not
    followed by a digit are removed."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        # Like the official code, the test is made on the *input* text, not on the partly processed one.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=int(_OFFICIAL_PERIOD_COUNT))


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower case, split on whitespace, number words zero..ten (and "none") ->
    digits, articles a/an/the dropped, known contractions restored ("dont" -> "don't"), joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The full official processing of a *prediction*: whitespace, punctuation, then digits/articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _check_answers(name: str, answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"{name} needs a non-empty list of reference answers, got {answers!r}")
    return list(answers)


def _leave_one_out(prediction: str, refs: Sequence[str]) -> float:
    matches = [a == prediction for a in refs]
    total = sum(matches)
    return sum(min(1.0, (total - int(hit)) / 3.0) for hit in matches) / len(matches)


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA-v2 soft accuracy, scorer ``vqa_v2``: the official ``vqaEval.py`` since its 2021 fix, in [0, 1].

    Whitespace is normalised on both sides; the punctuation and digit/article steps run on the prediction and the
    references only when the references disagree. Leave-one-out: for each reference i the prediction counts as
    matched ``min(1, m_i / 3)`` where m_i is the number of *other* references equal to it; the score is the mean over
    i. With 10 references and k of them equal to the prediction: 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >= 4.
    """
    refs = [_strip_whitespace(a) for a in _check_answers("vqa_accuracy", answers)]
    pred = _strip_whitespace(prediction)
    if len(set(refs)) > 1:
        refs = [process_digit_article(process_punctuation(a)) for a in refs]
        pred = process_digit_article(process_punctuation(pred))
    return _leave_one_out(pred, refs)


def vqa_accuracy_2016(prediction: str, answers: Sequence[str]) -> float:
    """VQA-v2 soft accuracy, scorer ``vqa_v2_2016``: the official ``vqaEval.py`` of 2016-2021, in [0, 1].

    The prediction is always fully normalised (:func:`normalize_vqa_answer`); the references get only
    :func:`process_punctuation`, and only when they are not all identical. Same leave-one-out average.
    """
    refs = _check_answers("vqa_accuracy", answers)
    if len(set(refs)) > 1:
        refs = [process_punctuation(a) for a in refs]
    return _leave_one_out(normalize_vqa_answer(prediction), refs)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0 (GQA, MT-Shapes)."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"exact_match needs a non-empty list of reference answers, got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    return float(any(normalize_vqa_answer(a) == pred for a in answers))


METRICS = {"vqa_v2": vqa_accuracy, "vqa_v2_2016": vqa_accuracy_2016, "exact": exact_match}
# dialogue source -> scorer name in METRICS; sources not listed (own data) use exact match.
SCORERS = {"vqa_v2": "vqa_v2", "gqa": "exact", "mt_shapes": "exact"}
JUDGED_SOURCES = {"convbench"}  # free-form answers: scored by pipeline.datasets.convbench's judge instead


def score(source: str, prediction: str, references: Sequence[str], metric: str | None = None) -> float:
    """Score in [0, 1] of one answer: by ``metric`` (a name in :data:`METRICS`) when given, else by the dialogue's
    source (docs/design.md §5)."""
    name = metric or SCORERS.get(source, "exact")
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
    return METRICS[name](prediction, references)


def same_answer(a: str, b: str) -> bool:
    """Two answers agree when equal after the VQA normalisation (case, punctuation, articles, number words)."""
    return normalize_vqa_answer(a) == normalize_vqa_answer(b)


def per_turn_accuracy(scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """Per-turn accuracy of a set of dialogues, in percent.

    ``scores[i][t]`` is the score in [0, 1] of turn t+1 of dialogue i. Dialogues may have different lengths. Returns
    ``{"Acc_1": .., ..., "Acc_T": .., "Avg": ..}``, where T is the longest dialogue, Acc_t is averaged over the
    dialogues that reach turn t, and Avg is the mean of the Acc_t.
    """
    if len(scores) == 0:
        raise ValueError("per_turn_accuracy needs at least one dialogue's scores")
    sums: list[float] = []
    counts: list[int] = []
    for i, dialogue in enumerate(scores):
        if len(dialogue) == 0:
            raise ValueError(f"dialogue {i} has no turn scores")
        for t, s in enumerate(dialogue):
            if not 0.0 <= float(s) <= 1.0:
                raise ValueError(f"score of dialogue {i} turn {t + 1} is {s}, outside [0, 1]")
            if t == len(sums):
                sums.append(0.0)
                counts.append(0)
            sums[t] += float(s)
            counts[t] += 1
    out = {f"Acc_{t + 1}": 100.0 * sums[t] / counts[t] for t in range(len(sums))}
    out["Avg"] = sum(out.values()) / len(sums)
    return out


def paired_avg_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]]
                          ) -> tuple[float, float | None, int]:
    """Avg of ``a`` minus Avg of ``b`` (:func:`per_turn_accuracy`, points) over the dialogues both hold (dialogue
    id -> score per turn), its standard error (None below two dialogues) and the number of dialogues N.

    The difference is a sum over dialogues of ``c_i = 100 * sum_t (a_it - b_it) / (T * n_t)`` (``n_t``: dialogues
    reaching turn t). The dialogues are independent draws, so its variance is estimated by ``N * var(c)`` (sample
    variance); with equal lengths this is the familiar ``sd(d) / sqrt(N)`` of the per-dialogue differences ``d``.
    Pairing removes what both methods get right or wrong on the same dialogue, which is most of the noise.
    """
    common = [k for k in a if k in b]
    if not common:
        raise ValueError("the two methods share no evaluated dialogue")
    for k in common:
        if len(a[k]) != len(b[k]) or not a[k]:
            raise ValueError(f"dialogue {k}: {len(a[k])} against {len(b[k])} turn scores; a paired comparison needs "
                             f"the same turns on both sides")
    turns = max(len(a[k]) for k in common)
    reach = [sum(len(a[k]) > t for k in common) for t in range(turns)]
    c = [100.0 * sum((float(x) - float(y)) / reach[t] for t, (x, y) in enumerate(zip(a[k], b[k]))) / turns
         for k in common]
    n = len(c)
    if n < 2:
        return sum(c), None, n
    mean = sum(c) / n
    return sum(c), (n * sum((v - mean) ** 2 for v in c) / (n - 1)) ** 0.5, n
