"""Key objects of a preference pair, weight-free: noun phrases of the question and both answers, ranked by what
the two answers disagree about, the question's focus, and the chosen answer's subject.

The noun phrases come from stages.key_phrases (or a parse, stages.parsed_phrases); this module ranks them.

The ranking (`rank_pair`), with its weights in `Weights`:
- `contrast`: an object the chosen answer names and the rejected one does not, or names with other modifiers
  (a colour, a material, a count); an object only the rejected answer names scores `rejected_only` (it is
  likely not in the picture);
- `question`: the question's focus: the phrase after "how many", the object of an attribute question ("what
  colour is the car"), the part rather than its owner ("the dog's eyes"), the thing something is printed or
  written on ("what does the sign say"), for "what is X doing" what X's first verb acts on in the answer ("lifts a
  steel beam") or X when that verb has none, the first phrase otherwise. When the question asks for something it
  does not name ("what is on the counter", "what is the girl holding", "what animal ...", "what is this", "what
  covers the ground"), its own phrases are the reference, demoted, and the focus is in the answer;
- `answer`: the chosen answer's subject: its first phrases, decreasing with their order.
Each phrase records which of these it scored by (`sources`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from stages.key_lexicon import (
    ATTRIBUTES,
    AUXILIARIES,
    CATEGORIES,
    DETERMINERS,
    PREPOSITIONS,
    PRONOUNS,
    can_be,
    participle,
    parts_of_speech,
    singular,
    verb_form,
    word_set,
)
from stages.key_phrases import Phrase, noun_phrases


# --------------------------------------------------------------------------------------------- the question
@dataclass
class Focus:
    phrase: str | None  # the question's own focus phrase, or None when it is in the answer
    references: frozenset[str]  # the question's phrases that are only its reference (demoted)
    doing: bool = False  # "what is X doing": X, unless the answer's verb has an object (then that object)


_WH_AUX = re.compile(r"^\s*(?:what|which|who)\s+(?:(\w+)\s+)?(?:is|are|was|were|'s|does|do|did)\s+(\S+)")
_IMPERATIVE = word_set("describe give tell show list name identify explain provide look write summarize summarise")


def question_focus(question: str, phrases: list[Phrase], chosen: list[Phrase] | None = None) -> Focus:
    """Where the question's object is: one of its phrases, or (None) the answer."""
    q = question.lower().replace("\u2019", "'").strip()
    names = [p.text for p in phrases]
    answer_heads = {p.head for p in chosen or []}
    if not phrases:
        return Focus(None, frozenset())
    if re.match(r"^\s*how\s+many\b", q):
        return Focus(phrases[0].text, frozenset())
    wh = re.match(r"^\s*(?:what|which)\s+(\w+)", q)
    if wh and wh.group(1) in ATTRIBUTES:  # "what colour is the car" -> car; "the dog's eyes" -> eye
        return _focus_on(_part_first(phrases), phrases)
    if wh and parts_of_speech(wh.group(1)).get("NOUN") and wh.group(1) not in AUXILIARIES | PRONOUNS | DETERMINERS:
        asked = singular(wh.group(1))
        if asked in CATEGORIES or asked not in answer_heads:  # "what animal": the answer names its object
            return Focus(None, frozenset(names))
        return Focus(asked, frozenset(n for n in names if n != asked))  # "which flag": the flag the answer names
    doing = re.match(r"^\s*what\s+(?:is|are|was|were)\s+.+?\s+doing\b(.*)$", q)
    if doing:
        tail = re.search(r"\bwith\s+(.+)$", doing.group(1))
        named = [p for p in phrases if tail and p.head in tail.group(1)]
        if named:  # "what is the girl doing with the kite": the kite
            return Focus(named[0].text, frozenset(p.text for p in phrases if p is not named[0]))
        return Focus(phrases[0].text, frozenset(), doing=True)
    if _asks_elsewhere(q):
        return Focus(None, frozenset(names))
    return _focus_on(_part_first(phrases), phrases)


_DISPLAY_PARTICIPLES = word_set(
    "printed written drawn painted displayed shown engraved embroidered stamped labelled labeled carved"
)
_DISPLAY_VERBS = word_set("say says read reads show shows display displays spell spells indicate indicates")


def _asks_elsewhere(q: str) -> bool:
    """Whether the question asks for an object it does not name: "what is on the table", "what is mounted on",
    "what is the girl holding", "what's this", "who is ...": its own phrases are the reference."""
    if q.startswith("who"):
        return True
    first = re.match(r"^\s*(?:what|which)\s+(\w+)", q)
    verb = first.group(1) if first else ""
    if verb not in AUXILIARIES and can_be(verb, "VERB") and parts_of_speech(verb)["VERB"][0] != verb:
        return True  # "what covers the ground", "what surrounds the lake": the verb's subject is answered
    m = _WH_AUX.match(q.replace("what's", "what is").replace("what're", "what are"))
    if m is None:
        return False
    word = m.group(2).strip("?.,")
    if word in PREPOSITIONS or word in ("this", "that", "it", "there", "these", "those"):
        return True
    if re.match(r"^\s*\w+\s+(?:\w+\s+)?(?:does|do|did)\b", q):
        # "what does the boy throw": the verb's object is in the answer; "what does the sign say": on the sign
        return not any(w.strip("?.,") in _DISPLAY_VERBS for w in q.split())
    rest = [w.strip("?.,") for w in q[m.end(2) :].split()]
    predicate = not can_be(word, "NOUN") or (bool(rest) and rest[0] in PREPOSITIONS)
    if can_be(word, "ADJ") and word not in DETERMINERS and predicate:
        return True  # "what is visible in the corner"
    if word in _DISPLAY_PARTICIPLES:
        return False  # "what is printed on the mug": what is printed is seen on the mug, its region
    if verb_form(word) or participle(word):
        return True  # "what is mounted above the stove", "what is standing on the pad"
    # "what is the girl holding", "what does the boy throw": a verb after the subject
    # After the subject's first word ("the girl holding"; not "the heading at the top"): "doing" too
    verbs = [w for w in rest[:5] if verb_form(w)]
    if word in DETERMINERS and rest and verbs and verbs[0] == rest[0]:
        verbs = verbs[1:]  # "what is the heading at the top": a noun after the determiner
    # "what is the man doing": the man (what he does is about him); "what is the girl holding": the answer's object
    return bool(verbs) and verbs[0] != "doing"


def _focus_on(phrase: str, phrases: list[Phrase]) -> Focus:
    """The focus, with the owner of a focused part as its reference ("the bride's dress": not the bride)."""
    owners = {p.owner for p in phrases if p.text == phrase and p.owner}
    return Focus(phrase, frozenset(p.text for p in phrases if p.head in owners))


def _part_first(phrases: list[Phrase]) -> str:
    """The first phrase, but a part before its owner ("the dog's eyes" -> eye)."""
    owned = [p for p in phrases if p.owner is not None]
    return owned[0].text if owned else phrases[0].text


# --------------------------------------------------------------------------------------------- the ranking
@dataclass(frozen=True)
class Weights:
    """How much each kind of evidence counts (see the module docstring)."""

    question: float = 4.0  # the question's focus
    contrast: float = 3.0  # named by the chosen answer and not the rejected one, or with other modifiers
    rejected_only: float = 0.5  # named only by the rejected answer
    answer: float = 2.0  # the chosen answer's first phrase; the k-th scores answer / k
    mention: float = 1.0  # named by the question (not as its reference)
    reference: float = -2.0  # the question's reference when its object is in the answer


@dataclass
class Ranked:
    phrase: str
    score: float
    sources: list[str]


def rank_pair(
    question: str,
    chosen: str,
    rejected: str,
    weights: Weights = Weights(),
    multiword: frozenset[tuple[str, ...]] = frozenset(),
    objects: frozenset[str] = frozenset(),
    phrases: Callable[[str], list[Phrase]] | None = None,
) -> list[Ranked]:
    """The pair's candidate objects, best first (ties: first mention, then alphabetical). `phrases`: a text's noun
    phrases (default: `noun_phrases` with `multiword` and `objects`; the spacy backend: from its parse)."""
    extract = phrases or (lambda text: noun_phrases(text, multiword, objects))
    q_phrases = extract(_without_imperative(question))
    c_phrases = extract(chosen)
    r_phrases = extract(rejected)
    focus = question_focus(question, q_phrases, c_phrases)
    if focus.doing:  # "the crane lifts a steel beam": what the doer acts on; "the man waves to a friend": the man
        asked = {p.text for p in q_phrases}
        acted_on = next((p for p in c_phrases if p.after_verb == 1 and p.text not in asked), None)
        if acted_on is not None:  # the doer stays a candidate: it is in the picture, doing it
            focus = Focus(acted_on.text, frozenset())
    scores: dict[str, float] = {}
    sources: dict[str, list[str]] = {}
    order: dict[str, tuple[int, int]] = {}

    def add(phrase: str, value: float, source: str, seen_at: tuple[int, int]) -> None:
        scores[phrase] = scores.get(phrase, 0.0) + value
        if value > 0 and source not in sources.setdefault(phrase, []):
            sources[phrase].append(source)
        order.setdefault(phrase, seen_at)

    asked = {p.text for p in q_phrases}
    # Per object, everything each answer says of it ("an old stone bridge ... on the bridge"): the union.
    described_r: dict[str, set[str]] = {}
    for p in r_phrases:
        described_r.setdefault(p.head, set()).update(p.modifiers)
    described_c: dict[str, set[str]] = {}
    for p in c_phrases:
        described_c.setdefault(p.head, set()).update(p.modifiers)
    for p in q_phrases:
        if p.text == focus.phrase:
            add(p.text, weights.question, "question", (0, p.position))
        elif p.text in focus.references:
            add(p.text, weights.reference, "question", (0, p.position))
        else:
            add(p.text, weights.mention, "question", (0, p.position))
    seen: set[str] = set()
    answer_rank = 0
    owners = {p.owner for p in c_phrases if p.owner}  # "an officer's cap": the cap is the object, not the officer
    for p in c_phrases:
        if p.text in seen:
            continue
        seen.add(p.text)
        # The question's reference is not in dispute, whichever answer repeats it.
        other = described_r.get(p.head)
        if p.text not in focus.references and (other is None or _differs(described_c[p.head], other)):
            add(p.text, weights.contrast, "contrast", (1, p.position))
        # The focus as the answer names it ("which flag" -> "the american flag"), or found in the answer ("what is
        # the crane doing" -> the beam it lifts); a phrase the question itself scored already is not counted twice.
        named = p.head == focus.phrase and p.text != focus.phrase
        found = p.text == focus.phrase and focus.phrase not in asked
        if focus.phrase is not None and (named or found) and "question" not in sources.get(p.text, []):
            add(p.text, weights.question, "question", (1, p.position))
        if p.text not in focus.references and p.head not in owners:
            answer_rank += 1
            add(p.text, weights.answer / answer_rank, "answer", (1, p.position))
        else:
            add(p.text, 0.0, "answer", (1, p.position))
    for p in r_phrases:
        if p.head not in described_c and p.text not in scores:
            add(p.text, weights.rejected_only, "contrast", (2, p.position))
    ranked = [Ranked(ph, s, sources.get(ph, [])) for ph, s in scores.items()]
    ranked.sort(key=lambda r: (-r.score, order[r.phrase], r.phrase))
    return ranked


def _differs(a: set[str], b: set[str]) -> bool:
    """What two answers say of one object differs: another colour, material, count or size."""
    return a != b


def _without_imperative(question: str) -> str:
    """ "Describe the image", "Give a description of ...": the leading verb is not an object."""
    words = question.strip().split(maxsplit=1)
    if len(words) == 2 and words[0].lower() in _IMPERATIVE:
        return words[1]
    return question
