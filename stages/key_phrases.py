"""Noun phrases of a text, read from its words alone (the keywords stage's `lexicon` backend; the `spacy`
backend reads them from a parse, stages.parsed_phrases). The vocabulary is stages.key_lexicon.

A phrase is a run of modifiers and nouns closed by a determiner, a preposition, a verb, a conjunction or
punctuation. Its head is the last noun, singular; the phrase passed on is the text's own compound
("fire hydrant", "totem pole"), without determiners, numbers, colour, material or other adjectives, which are
kept as the phrase's modifiers (they tell "a red car" from "a blue car"). A word that can be a noun or a verb
is a verb when it agrees with the noun before it as its subject ("snow covers", "people line the street"), a
determiner follows it, or a pronoun, "to" or a relative pronoun comes before it ("she stirs", "to catch");
once a clause has its verb, a plural after a noun is a compound's head ("is wearing rain boots"). A colour word
that names a thing too (orange, salmon, olive) or a material word is an object only with a determiner or a
participle of its own ("an orange", "grilled salmon"), never as a modifier ("orange spacesuit"), a shade
("mustard yellow") or a predicate ("is orange"); other colour words are never objects. Measure and collective
nouns, containers and an object's parts resolve to their complement ("a flock of birds" -> bird, "a blanket of
snow" -> snow, "a bowl of ramen" -> ramen, "the handle of a racket" -> racket); "the X of Y" with an attribute X
("the colour of the car") to Y. Position words (left, top, background) and generic words (picture, object,
thing) are never phrases. Multi-word names the lexicon knows ("hot dog", "teddy bear") are one noun. Any noun is
a candidate, known to the lexicon or not (Grounding DINO takes any phrase).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from stages.key_lexicon import (
    ADVERBIAL_PAIRS,
    ADVERBS,
    ATTRIBUTES,
    AUXILIARIES,
    CLAUSE_ENDS,
    CLOSED,
    COLLECTIVES,
    COLOUR_NOUNS,
    COLOURS,
    CONJUNCTIONS,
    CONTAINERS,
    DETERMINERS,
    GENERIC,
    MATERIALS,
    NUMBERS,
    OBJECT_PARTS,
    PLURAL_DETERMINERS,
    POSITIONS,
    PREPOSITIONS,
    PRONOUNS,
    SUBJECT_PRONOUNS,
    WH_WORDS,
    can_be,
    inflected,
    is_plural,
    is_unknown,
    parts_of_speech,
    singular,
    verb_form,
)

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|'s\b|[^\sa-z0-9]")


@dataclass
class Phrase:
    text: str  # what is passed on: the compound with a singular head ("fire hydrant")
    head: str  # the head noun, singular
    modifiers: set[str]  # adjectives, colours, materials, numbers; "the bus is red" too
    position: int  # order among the text's phrases
    owner: str | None = None  # "the dog's eyes": eye, owned by dog
    has_determiner: bool = False
    after_verb: int = 0  # right after the text's k-th verb: its object ("stirs a pot of soup"); 0: not


@dataclass
class Chunk:
    """A noun phrase as it is read, word by word (here, or from a parse: stages.parsed_phrases)."""

    nouns: list[str] = field(default_factory=list)
    modifiers: list[str] = field(default_factory=list)
    determiner: bool = False
    article: str = ""  # the determiner itself
    plural: bool = False  # "two", "several", "these": the head is plural ("two totem poles")

    def empty(self) -> bool:
        return not self.nouns and not self.modifiers


def noun_phrases(
    text: str, multiword: frozenset[tuple[str, ...]] = frozenset(), objects: frozenset[str] = frozenset()
) -> list[Phrase]:
    """The text's noun phrases in order (see the module docstring for the rules). `multiword`: names of several
    words read as one noun; `objects`: single-word object names (singular), which are nouns before verbs."""
    tokens = _merge_multiword(_TOKEN.findall(text.lower().replace("\u2019", "'")), multiword)
    phrases: list[Phrase] = []
    chunk = Chunk()
    pending_owner: str | None = None  # the phrase before a possessive 's
    pending_of: Phrase | None = None  # "X of": X waits for the phrase after "of"

    verb_at = -2  # where the last verb was
    verbs = 0  # how many verbs so far
    chunk_start: int | None = None  # where the open phrase began

    def close() -> Phrase | None:
        nonlocal chunk, pending_owner, pending_of, chunk_start
        phrase = chunk_phrase(chunk, len(phrases))
        chunk = Chunk()
        start, chunk_start = chunk_start, None
        if phrase is None:
            return None
        phrase.after_verb = verbs if start is not None and start == verb_at + 1 else 0
        if pending_owner is not None:
            phrase.owner, pending_owner = pending_owner, None
        if pending_of is not None:  # "a flock of birds" -> bird; "the colour of the car" -> car
            phrase.position, phrase.after_verb, pending_of = pending_of.position, pending_of.after_verb, None
        phrases.append(phrase)
        return phrase

    finite = False  # the clause has its verb already: an ambiguous word after that is a noun ("wears rain boots")
    skip_to = 0  # tokens a predicate consumed ("is bright orange")
    for i, tok in enumerate(tokens):
        if chunk_start is None and (chunk.determiner or not chunk.empty()):
            chunk_start = i - 1  # the previous token opened it
        if i < skip_to:
            continue
        if (tok, tokens[i + 1] if i + 1 < len(tokens) else "") in ADVERBIAL_PAIRS:
            close()
            skip_to = i + 2
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        prev = tokens[i - 1] if i else ""
        new_subject = nxt in DETERMINERS or nxt in SUBJECT_PRONOUNS  # ", the man waves", "and she smiles"
        if tok in CLAUSE_ENDS or tok in (".", ";", "!", "?", ":") or (tok in (",", "and", "or") and new_subject):
            finite = False  # a new clause (", the man waves"): its verb is still to come
        if tok in AUXILIARIES:
            finite = True
        aside = prev == "," and i > 1 and _modifier_like(tokens[i - 2]) and bool(phrases)
        if aside and inflected(tok) and chunk.empty() and not finite:
            finite, verb_at, verbs = True, i, verbs + 1
            continue  # "a row of bins, green and black, stands on ...": the verb after an aside
        relative = prev in ("which", "who") and i > 1  # "..., which stand out": not "Which flag hangs ...?"
        if (prev in SUBJECT_PRONOUNS or relative) and can_be(tok, "VERB") and not chunk.nouns:
            finite, verb_at, verbs = True, i, verbs + 1
            continue  # "she stirs a pot": the pronoun's verb
        if (
            prev == "to"
            and can_be(tok, "VERB")
            and parts_of_speech(tok)["VERB"][0] == tok
            and nxt not in PREPOSITIONS | {","}
        ):
            verb_at, verbs = i, verbs + 1
            continue  # "to catch a frisbee", "to watch a band": an infinitive
        if prev in ("and", "then") and inflected(tok) and singular(tok) not in objects and not chunk.nouns:
            verb_at, verbs = i, verbs + 1
            continue  # "runs along the beach and leaps": a second verb of the same subject
        if tok == "'s" and i and (tokens[i - 1] in WH_WORDS or tokens[i - 1] in PRONOUNS):
            close()  # "what's", "it's", "there's": is
            continue
        if tok == "'s":
            owner = close()
            pending_owner = owner.head if owner else None
            if owner is not None:
                phrases.remove(owner)  # the owner comes back as the part's owner below
                phrases.append(owner)
            continue
        if tok == "of":
            last = close()
            if last is not None and (last.head in COLLECTIVES | ATTRIBUTES | CONTAINERS | OBJECT_PARTS):
                phrases.remove(last)
                pending_of = last
            continue
        if tok in DETERMINERS and not (tok in PRONOUNS and _boundary(nxt)):
            close()
            chunk.determiner, chunk.article = True, tok
            chunk.plural = tok in PLURAL_DETERMINERS
            continue
        if tok in AUXILIARIES and chunk.nouns:
            subject = close()  # "the bus is red": the predicate's adjectives describe the subject
            j = i + 1
            while subject is not None and j < len(tokens) and tokens[j] in ADVERBS:
                j += 1
            while subject is not None and j < len(tokens) and _predicate_adjective(tokens[j], tokens, j):
                if tokens[j] not in ("and", ","):
                    subject.modifiers.add(tokens[j])
                j += 1
            if j < len(tokens) and _nounable(tokens[j]) and tokens[j] not in COLOURS | MATERIALS:
                j = i + 1  # "is a tall lighthouse", "are wooden chairs": a noun phrase, read as one
            skip_to = j
            finite = True
            continue
        if tok in (",", "and") and chunk.modifiers and not chunk.nouns and _modifier_like(nxt):
            continue  # "a small, silver teaspoon", "a red and gold blanket": the adjectives go on
        if (
            tok in PREPOSITIONS
            or tok in AUXILIARIES
            or tok in WH_WORDS
            or tok in PRONOUNS
            or tok in CONJUNCTIONS
            or not tok[0].isalnum()
        ):
            close()
            continue
        if tok in ADVERBS:
            if chunk.nouns:
                close()
            continue
        if tok in NUMBERS or tok.isdigit():
            if chunk.nouns:
                close()
            chunk.modifiers.append(tok)
            chunk.plural = chunk.plural or tok not in ("one", "single", "1")
            continue
        if "-" in tok and " " not in tok and _hyphen_modifier(tok):
            if chunk.nouns:
                close()
            chunk.modifiers.append(tok)  # "half-chopped", "heart-shaped", "needle-like", "rolled-up"
            continue
        is_noun = " " in tok or can_be(tok, "NOUN") or is_unknown(tok)
        pronoun_like = chunk.article in ("other", "another", "each", "both", "one") and chunk.empty()
        if pronoun_like and inflected(tok) and _boundary(nxt):
            chunk = Chunk()
            finite, verb_at, verbs = True, i, verbs + 1
            continue  # "while the other watches": the determiner stood for a noun, this is its verb
        if is_noun and verb_form(tok) and chunk.nouns and nxt == "of":
            chunk.nouns.append(tok)  # "a crayon drawing of a house": a noun before "of"
            continue
        if is_noun and chunk.nouns and can_be(tok, "ADJ") and (nxt in PREPOSITIONS or nxt == "enough"):
            close()  # "a vase full of daffodils": an adjective after its noun
            continue
        if is_noun and prev in WH_WORDS and parts_of_speech(tok).get("VERB", (tok,))[0] != tok and not chunk.nouns:
            continue  # "what covers the ground": the question's verb
        if tok in COLOURS or tok in MATERIALS:
            # A modifier when a noun follows in the phrase; a noun only with its own determiner ("an orange").
            if chunk.nouns and tok not in COLOUR_NOUNS and tok in COLOURS:
                chunk.modifiers.append(chunk.nouns.pop())  # "mustard yellow", "sky blue": a shade, not a thing
            if chunk.nouns:
                close()
            singular_article = chunk.article in ("a", "an", "one", "this", "that", "each", "every", "another")
            after = tokens[i + 2] if i + 2 < len(tokens) else ""
            ends = _boundary(nxt) and not (nxt in (",", "and") and _modifier_like(after))
            # "a flat stone" is a stone, "grilled salmon" a salmon; "a deep olive", "bright orange" colours
            described = any(verb_form(m) for m in chunk.modifiers)
            bare = not chunk.modifiers or tok in MATERIALS or described
            names = tok in COLOUR_NOUNS or tok in MATERIALS
            if names and (chunk.determiner or described) and bare and (ends or (singular_article and inflected(nxt))):
                chunk.nouns.append(tok)  # "an orange", "an orange sits"
            else:
                chunk.modifiers.append(tok)
            continue
        # "a flock of birds flies": the verb agrees with the collective (singular), not with its complement
        plural = is_plural(chunk.nouns[-1]) and pending_of is None if chunk.nouns else False
        # "rain boots": a known object's plural after a noun, in a clause that has its verb, is a compound's head
        # (and a plural before a comma: "a pile of autumn leaves, orange and brown, ...")
        plural_form = singular(tok) != tok
        known = plural_form and nxt not in DETERMINERS and (finite or nxt in (",", ";"))
        agrees = not (chunk.plural and not plural)
        after = tokens[i + 2] if i + 2 < len(tokens) else ""
        if is_noun and chunk.nouns and not known and agrees and _verb_after(plural, tok, nxt, after):
            close()  # "snow covers the hillside": the subject's verb ends the phrase
            finite, verb_at, verbs = True, i, verbs + 1
            continue
        if is_noun and verb_form(tok):  # "holding", "building", "painting": a noun only after a determiner
            if chunk.determiner and not chunk.nouns:
                modifies = _nounable(nxt) and not inflected(nxt)  # "a sleeping cat"; "the heading reads"
                (chunk.modifiers if modifies else chunk.nouns).append(tok)
            else:
                close()
                finite, verb_at, verbs = True, i, verbs + 1
            continue
        more = _nounable(nxt) or _modifier_like(nxt) or (nxt == "," and not chunk.nouns and _modifier_like(after))
        if is_noun and can_be(tok, "ADJ") and (not chunk.determiner or more):
            if chunk.nouns:
                close()
            chunk.modifiers.append(tok)  # "small", "round", "dark": adjectives, unless a determiner makes a noun
            continue
        if is_noun:
            chunk.nouns.append(tok)
            continue
        if can_be(tok, "ADJ") or (verb_form(tok) and not chunk.nouns and (chunk.determiner or _nounable(nxt))):
            if chunk.nouns:
                close()
            chunk.modifiers.append(tok)  # "a tall lighthouse", "a sleeping cat"
            continue
        close()  # a verb or anything else ends the phrase
        if can_be(tok, "VERB"):
            finite, verb_at, verbs = True, i, verbs + 1
    close()
    # "what colour ...", "reaching for a piece": no "of" came to resolve them
    return [p for p in phrases if p.head not in ATTRIBUTES and p.head not in GENERIC]


def _predicate_adjective(tok: str, tokens: list[str], j: int) -> bool:
    """An adjective, colour, material or number after "is" ("is red", "are wooden", "is bright and round")."""
    if tok in ("and", ","):
        return j + 1 < len(tokens) and _predicate_adjective(tokens[j + 1], tokens, j + 1)
    return (
        tok in COLOURS
        or tok in MATERIALS
        or tok in NUMBERS
        or tok.isdigit()
        or (can_be(tok, "ADJ") and not can_be(tok, "VERB"))
    )


def _modifier_like(tok: str) -> bool:
    """A colour, material, number or adjective that can go on a run of modifiers ("small, silver", "red and")."""
    if not tok or not tok[0].isalnum() or tok in CLOSED:
        return False
    if tok in COLOURS or tok in MATERIALS or tok in NUMBERS:
        return True
    return can_be(tok, "ADJ") or verb_form(tok) or ("-" in tok and _hyphen_modifier(tok))


def _hyphen_modifier(tok: str) -> bool:
    """A hyphenated word that describes rather than names: its last part is an adjective, a participle or a
    particle ("heart-shaped", "half-chopped", "needle-like", "face-down", "rolled-up", "blue-green")."""
    last = tok.rsplit("-", 1)[-1]
    if last in ("like", "down", "up", "out", "off", "in", "on", "over", "free", "sized", "style"):
        return True
    if last in COLOURS or last in MATERIALS:
        return True
    pos = parts_of_speech(last)
    return bool(pos) and ("NOUN" not in pos or verb_form(last))


def _nounable(tok: str) -> bool:
    if not tok or not tok[0].isalnum() or tok in CLOSED:
        return False
    return " " in tok or can_be(tok, "NOUN") or is_unknown(tok)


def _boundary(tok: str) -> bool:
    return not tok or tok in PREPOSITIONS or tok in AUXILIARIES or tok in CONJUNCTIONS or not tok[0].isalnum()


def _verb_after(subject_plural: bool, word: str, nxt: str, after: str = "") -> bool:
    """Whether a noun-or-verb word after a noun is that noun's verb: it agrees with it in number, or a determiner
    follows it. Otherwise it is a compound ("dog bed")."""
    if " " in word or not can_be(word, "VERB") or nxt in AUXILIARIES:  # "the dog beds are": the verb follows
        return False
    if can_be(nxt, "VERB") and nxt not in PREPOSITIONS and after in DETERMINERS:  # "model ships crowd the shelf"
        return False
    if nxt in DETERMINERS and nxt not in ("that", "this"):
        return True
    verb_lemma = parts_of_speech(word).get("VERB", (word,))[0]
    third_person = word != verb_lemma and word.endswith("s")
    if third_person:  # "snow covers"; "two slices stands" too (a plural noun does not modify another)
        return True
    return word == verb_lemma and subject_plural and not word.endswith("s") and _boundary_or_object(nxt)


def _boundary_or_object(tok: str) -> bool:
    return _boundary(tok) or tok in DETERMINERS or tok in ADVERBS or tok in PRONOUNS


def chunk_phrase(chunk: Chunk, position: int) -> Phrase | None:
    """The phrase passed on for a chunk: its compound with a singular head, without position or generic words;
    None when nothing is left (an attribute or collective head is kept, to be resolved by a following "of")."""
    nouns = [n for n in chunk.nouns if singular(n) not in POSITIONS | GENERIC]
    last = singular(chunk.nouns[-1]) if chunk.nouns else ""
    if not chunk.nouns or last in POSITIONS or last in GENERIC:
        if last in ATTRIBUTES | COLLECTIVES:
            head = last  # kept only to be resolved by a following "of"
            return Phrase(head, head, set(chunk.modifiers), position, has_determiner=chunk.determiner)
        return None
    *front, last = nouns
    head = singular(last)
    text = " ".join([*front, head])
    return Phrase(text, head, set(chunk.modifiers), position, has_determiner=chunk.determiner)


def _merge_multiword(tokens: list[str], multiword: frozenset[tuple[str, ...]]) -> list[str]:
    """Known multi-word names as one token ("hot dog", "teddy bear"), longest first; plurals too ("hot dogs")."""
    if not multiword:
        return tokens
    longest = max(len(k) for k in multiword)
    out, i = [], 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 1, -1):
            words = tuple(tokens[i : i + n])
            if words in multiword or (*words[:-1], singular(words[-1])) in multiword:
                out.append(" ".join(words))
                i += n
                break
        else:
            out.append(tokens[i])
            i += 1
    return out
