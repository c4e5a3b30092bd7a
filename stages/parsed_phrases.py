"""Noun phrases from a dependency parse (the keywords stage's `spacy` backend), as `key_phrases.noun_phrases` reads
them from the words alone, so that both backends rank by the same `key_objects.rank_pair`.

The parse decides what the rules guess: which words are nouns, verbs and adjectives (spaCy's `pos_`), where a noun
phrase starts and ends (`doc.noun_chunks`), whose part a noun is (`poss`), what a verb acts on (`dobj`), what
describes a subject from across a verb (`acomp`: "the bus is red"), and what an "of" attaches to ("a flock of
birds"). The vocabulary rules stay those of `key_lexicon`: closed-class words, position and generic words are never
phrases, a colour or material word is a modifier unless a determiner makes it a thing of its own ("an orange"),
measure and collective nouns, containers, parts and attributes resolve to their "of" complement, and known
multi-word names ("hot dog") stay one noun. Reads a spaCy `Doc` through its attributes only: no spaCy import.
"""

from __future__ import annotations

from typing import Any

from stages.key_lexicon import (
    ATTRIBUTES,
    CLOSED,
    COLLECTIVES,
    COLOUR_NOUNS,
    COLOURS,
    CONTAINERS,
    GENERIC,
    MATERIALS,
    NUMBERS,
    OBJECT_PARTS,
    PLURAL_DETERMINERS,
    singular,
)
from stages.key_phrases import Chunk, Phrase, chunk_phrase

NOUN_TAGS = frozenset({"NOUN", "PROPN"})
OBJECT_DEPS = frozenset({"dobj", "obj"})
SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass"})
RESOLVED_BY_OF = COLLECTIVES | ATTRIBUTES | CONTAINERS | OBJECT_PARTS


def parsed_phrases(doc: Any, multiword: frozenset[tuple[str, ...]] = frozenset()) -> list[Phrase]:
    """The noun phrases of a parsed text in order (a spaCy `Doc` with a dependency parse)."""
    verbs = [t.i for t in doc if t.pos_ == "VERB"]
    phrases: list[Phrase] = []
    waiting: dict[int, Phrase] = {}  # the token index of an "of" -> the collective ("a flock") it resolves
    for span in doc.noun_chunks:
        root = span.root
        if root.pos_ == "PRON":
            continue
        owners = [t for t in span if t.dep_ == "poss" and t.pos_ in NOUN_TAGS]
        owned = {w.i for o in owners for w in o.subtree}  # "the old man's hat": the owner's own words
        for o in owners:  # the owner is a phrase too, before its part ("the dog's eyes": dog, then eye)
            owner = chunk_phrase(_chunk([w for w in o.subtree if w.dep_ != "case"], multiword), len(phrases))
            if owner is not None:
                phrases.append(owner)
        chunk = _chunk([t for t in span if t.i not in owned and t.dep_ != "case"], multiword)
        phrase = chunk_phrase(chunk, len(phrases)) if chunk.nouns else None
        if phrase is None:
            continue
        for t in root.head.children if root.dep_ in SUBJECT_DEPS else ():
            if t.dep_ == "acomp":  # "the bus is red", "the eyes are green and round"
                phrase.modifiers.update(w.lower_ for w in t.subtree if w.pos_ == "ADJ")
        if root.dep_ in OBJECT_DEPS and root.head.pos_ == "VERB" and root.head.i in verbs:
            phrase.after_verb = verbs.index(root.head.i) + 1
        if owners:
            phrase.owner = singular(owners[-1].lower_)
        of = root.head if root.dep_ == "pobj" and root.head.lower_ == "of" else None
        if of is not None and of.i in waiting:  # "a flock of birds" -> bird, where the flock was
            collective = waiting.pop(of.i)
            phrase.position, phrase.after_verb = collective.position, collective.after_verb
        phrases.append(phrase)
        if phrase.head in RESOLVED_BY_OF:
            of_child = next((t for t in root.rights if t.lower_ == "of" and t.dep_ == "prep"), None)
            if of_child is not None:
                phrases.pop()
                waiting[of_child.i] = phrase
    phrases.extend(waiting.values())  # a collective with nothing after its "of" stands for itself
    # "what colour ...", "the background": an attribute or generic head that no "of" resolved is no object
    return [p for p in phrases if p.head not in ATTRIBUTES | GENERIC]


def _chunk(tokens: list[Any], multiword: frozenset[tuple[str, ...]]) -> Chunk:
    """The words of a noun chunk sorted as `key_phrases` sorts them: determiner, modifiers, nouns."""
    chunk = Chunk()
    words = [t.lower_ for t in tokens]
    name = _multiword_suffix(words, multiword)  # "a hot dog": one noun, whatever "hot" was tagged
    body = tokens[: len(tokens) - name] if name else tokens
    for t in body:
        word = t.lower_
        if not word[:1].isalnum():
            continue
        if t.pos_ == "DET" or t.dep_ in ("det", "predet"):
            chunk.determiner, chunk.article = True, word
            chunk.plural = chunk.plural or word in PLURAL_DETERMINERS
        elif t.pos_ == "NUM" or word in NUMBERS:
            chunk.modifiers.append(word)
            chunk.plural = chunk.plural or word not in ("one", "single", "1")
        elif word in CLOSED:
            continue  # a closed-class word is never a noun, however it was tagged
        elif t.pos_ in NOUN_TAGS and t.i == tokens[-1].i and not _colour_or_material(word, chunk.determiner):
            chunk.nouns.append(word)
        elif t.pos_ in NOUN_TAGS and t.dep_ == "compound" and word not in COLOURS | MATERIALS:
            chunk.nouns.append(word)  # "fire hydrant", "totem pole"
        else:
            chunk.modifiers.append(word)  # adjectives, participles, colour and material words
    if name:
        chunk.nouns.append(" ".join(words[len(words) - name :]))
    return chunk


def _colour_or_material(word: str, determiner: bool) -> bool:
    """A colour or material word as a phrase's head: a thing only with a determiner ("an orange", "the lime")."""
    if word in COLOURS - COLOUR_NOUNS:
        return True
    return word in COLOUR_NOUNS | MATERIALS and not determiner


def _multiword_suffix(words: list[str], multiword: frozenset[tuple[str, ...]]) -> int:
    """How many of the chunk's last words form a known multi-word name ("hot dogs"), longest first; 0: none."""
    for n in range(min(len(words), max((len(k) for k in multiword), default=0)), 1, -1):
        tail = tuple(words[-n:])
        if tail in multiword or (*tail[:-1], singular(tail[-1])) in multiword:
            return n
    return 0
