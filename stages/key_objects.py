"""Key objects of a preference pair, weight-free: noun phrases of the question and both answers, ranked by what
the two answers disagree about, the question's focus, and the chosen answer's subject.

Written by hand because no installable library does this without a downloaded model: spaCy and NLTK need a
pipeline or corpus fetched at run time. `lemminflect` (its dictionary ships in the wheel) says which parts of
speech a word can take and gives its singular; the rules below decide among them from the context.

Noun phrases. A phrase is a run of modifiers and nouns closed by a determiner, a preposition, a verb, a
conjunction or punctuation. Its head is the last noun, singular; the phrase passed on is the text's own compound
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
from dataclasses import dataclass, field
from functools import lru_cache


# --------------------------------------------------------------------------------------------- word lists
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())



# Closed classes: written out because they are small and fixed; everything open-class comes from lemminflect.
DETERMINERS = _words(
    "a an the this that these those some any each every several many few both either neither another other "
    "no his her their its my your our whose such all most"
)
PREPOSITIONS = _words(
    "on in at of with beside besides near under above behind by from into onto over between among across along "
    "around against through toward towards inside outside underneath below beneath beyond atop upon within "
    "without next to for like about during via past up down off out than as"
)
AUXILIARIES = _words(
    "is are was were be been being am has have had do does did can could will would may might shall should must "
    "'re 're"
)
WH_WORDS = _words("what which who whom whose where when why how")
PRONOUNS = _words(
    "it its they them he him she her we us i me you there here one ones itself themselves himself herself "
    "this that something anything nothing someone everyone"
)
CONJUNCTIONS = _words("and or but nor so yet while whereas although because if then")
ADVERBS = _words("very quite rather too also just only really slightly mostly partly fully almost not")
NUMBERS = _words(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen twenty thirty "
    "dozens hundred hundreds single double"
)
COLOURS = _words(
    "red orange yellow green blue purple violet pink brown black white grey gray silver gold golden beige tan "
    "cream ivory navy teal turquoise cyan magenta maroon crimson scarlet lime olive peach salmon coral lemon "
    "cherry chocolate amber bronze copper lavender lilac mauve khaki charcoal burgundy rust mint emerald ruby "
    "jade indigo aqua blond blonde dark light bright pale colorful colourful multicolored multicoloured"
)
# Colour words that also name things ("an orange", "grilled salmon"); every other colour word is never an object.
COLOUR_NOUNS = _words(
    "orange lime olive peach salmon coral lemon cherry chocolate cream ivory amber bronze copper gold silver "
    "lavender lilac mint emerald ruby jade rust charcoal burgundy navy indigo turquoise"
)
MATERIALS = _words(
    "wooden wood metal metallic steel iron stone glass plastic leather cotton wool woolen woollen silk paper "
    "cardboard ceramic porcelain brick concrete marble granite rubber denim velvet straw wicker bamboo "
    "aluminum aluminium tin clay canvas fur lace linen nylon"
)
POSITIONS = _words(
    "left right top bottom side front back middle center centre foreground background corner edge rear upper "
    "lower far near distance inside outside surface part half area portion end row"
)
GENERIC = _words(
    "picture image photo photograph scene view shot frame object thing item stuff kind type sort lot lots "
    "number way color colour shape size material pattern texture brand name detail details style feature "
    "structure figure element something anything image's photo's subject focus description overview summary "
    "detail details piece pieces"
)
# "the X of Y": X names a property of Y, so Y is the object.
ATTRIBUTES = _words(
    "color colour shape size material pattern texture brand name breed flavor flavour kind type sort style "
    "number amount height length width weight age model make condition"
)
# "a X of Y": X measures or groups Y, so Y is the object (a container, "a cup of tea", is an object itself).
COLLECTIVES = _words(
    "pair couple flock herd pack school swarm group crowd bunch bouquet cluster slice piece chunk sea blanket "
    "carpet sheet layer stack pile heap line set series lot lots variety array assortment collection handful "
    "bundle team family dozen string mass cloud field forest wall range plate bowl cup glass tangle mound patch "
    "strip clump sprinkle dusting splash swirl ring wedge square scoop bar loaf sprig stick dollop pat drop "
    "sliver roll"
) - {"plate", "bowl", "cup", "glass", "wall"}
# "a bowl of ramen", "the handle of a racket": what the container holds and what the part belongs to name the
# object (their regions overlap); a container alone ("a bowl") is an object of its own.
CONTAINERS = _words(
    "bowl plate cup glass mug jar bottle box bag basket crate tray pot pan can carton tin vase bucket sack "
    "packet pack case dish platter"
)
OBJECT_PARTS = _words("handle lid rim tip base stem blade screen cover leg spout strap sole cap knob")
# Nouns whose plural is the object's name ("glasses" are not two glasses), and irregular plurals.
PLURAL_NOUNS = _words(
    "people men women children police cattle sheep deer fish clothes geese mice teeth glasses eyeglasses sunglasses "
    "scissors pants trousers jeans shorts binoculars goggles tongs pliers headphones earphones pajamas overalls"
)
# "what X ...", "which X ...": X names a category, which the answer's object belongs to.
CATEGORIES = _words(
    "animal animals vehicle vehicles utensil utensils drink drinks beverage food foods fruit fruits vegetable "
    "vegetables object objects item items thing things tool tools device devices appliance appliances furniture "
    "instrument instruments toy toys plant plants sport sports game dish dishes meal clothing garment garments "
    "accessory accessories building buildings structure structures creature creatures breed species kind type "
    "sort brand animal's piece pieces equipment gadget machine container shape"
)
# Fixed adverbial phrases whose nouns name nothing in the picture ("lies face down", "turned upside down").
ADVERBIAL_PAIRS = frozenset({("face", "down"), ("face", "up"), ("upside", "down"), ("inside", "out"), ("side", "by")})
_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|'s\b|[^\sa-z0-9]")


@lru_cache(maxsize=65536)
def _pos(word: str) -> dict[str, tuple[str, ...]]:
    """The parts of speech a word can take, with its lemmas (lemminflect's dictionary)."""
    import lemminflect

    return dict(lemminflect.getAllLemmas(word))


def singular(word: str) -> str:
    if " " in word:  # "teddy bears" -> "teddy bear"
        *front, last = word.split(" ")
        return " ".join([*front, singular(last)])
    if word in PLURAL_NOUNS - {"geese", "mice", "teeth", "men", "women", "children"}:
        return word
    lemmas = _pos(word).get("NOUN")
    if lemmas:
        verbs = _pos(word).get("VERB", ())
        return next((lemma for lemma in lemmas if lemma not in verbs), lemmas[0])  # "leaves" -> leaf, not leave
    import lemminflect

    oov = lemminflect.getAllLemmasOOV(word, "NOUN").get("NOUN")
    return oov[0] if oov else word


def _is_plural(word: str) -> bool:
    return word in PLURAL_NOUNS or singular(word) != word


def _can_be(word: str, pos: str) -> bool:
    return pos in _pos(word)


def _is_unknown(word: str) -> bool:
    """A word the dictionary does not know (sundial-like rarities, "space-suit"): taken as a noun."""
    return not _pos(word) and word.replace("-", "").isalpha() and len(word) > 2


# --------------------------------------------------------------------------------------------- phrases
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
        if aside and _inflected(tok) and chunk.empty() and not finite:
            finite, verb_at, verbs = True, i, verbs + 1
            continue  # "a row of bins, green and black, stands on ...": the verb after an aside
        relative = prev in ("which", "who") and i > 1  # "..., which stand out": not "Which flag hangs ...?"
        if (prev in SUBJECT_PRONOUNS or relative) and _can_be(tok, "VERB") and not chunk.nouns:
            finite, verb_at, verbs = True, i, verbs + 1
            continue  # "she stirs a pot": the pronoun's verb
        if prev == "to" and _can_be(tok, "VERB") and _pos(tok)["VERB"][0] == tok and nxt not in PREPOSITIONS | {","}:
            verb_at, verbs = i, verbs + 1
            continue  # "to catch a frisbee", "to watch a band": an infinitive
        if prev in ("and", "then") and _inflected(tok) and singular(tok) not in objects and not chunk.nouns:
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
        is_noun = " " in tok or _can_be(tok, "NOUN") or _is_unknown(tok)
        pronoun_like = chunk.article in ("other", "another", "each", "both", "one") and chunk.empty()
        if pronoun_like and _inflected(tok) and _boundary(nxt):
            chunk = Chunk()
            finite, verb_at, verbs = True, i, verbs + 1
            continue  # "while the other watches": the determiner stood for a noun, this is its verb
        if is_noun and _verb_form(tok) and chunk.nouns and nxt == "of":
            chunk.nouns.append(tok)  # "a crayon drawing of a house": a noun before "of"
            continue
        if is_noun and chunk.nouns and _can_be(tok, "ADJ") and (nxt in PREPOSITIONS or nxt == "enough"):
            close()  # "a vase full of daffodils": an adjective after its noun
            continue
        if is_noun and prev in WH_WORDS and _pos(tok).get("VERB", (tok,))[0] != tok and not chunk.nouns:
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
            described = any(_verb_form(m) for m in chunk.modifiers)
            bare = not chunk.modifiers or tok in MATERIALS or described
            names = tok in COLOUR_NOUNS or tok in MATERIALS
            if names and (chunk.determiner or described) and bare and (ends or (singular_article and _inflected(nxt))):
                chunk.nouns.append(tok)  # "an orange", "an orange sits"
            else:
                chunk.modifiers.append(tok)
            continue
        # "a flock of birds flies": the verb agrees with the collective (singular), not with its complement
        plural = _is_plural(chunk.nouns[-1]) and pending_of is None if chunk.nouns else False
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
        if is_noun and _verb_form(tok):  # "holding", "building", "painting": a noun only after a determiner
            if chunk.determiner and not chunk.nouns:
                modifies = _nounable(nxt) and not _inflected(nxt)  # "a sleeping cat"; "the heading reads"
                (chunk.modifiers if modifies else chunk.nouns).append(tok)
            else:
                close()
                finite, verb_at, verbs = True, i, verbs + 1
            continue
        more = _nounable(nxt) or _modifier_like(nxt) or (nxt == "," and not chunk.nouns and _modifier_like(after))
        if is_noun and _can_be(tok, "ADJ") and (not chunk.determiner or more):
            if chunk.nouns:
                close()
            chunk.modifiers.append(tok)  # "small", "round", "dark": adjectives, unless a determiner makes a noun
            continue
        if is_noun:
            chunk.nouns.append(tok)
            continue
        if _can_be(tok, "ADJ") or (_verb_form(tok) and not chunk.nouns and (chunk.determiner or _nounable(nxt))):
            if chunk.nouns:
                close()
            chunk.modifiers.append(tok)  # "a tall lighthouse", "a sleeping cat"
            continue
        close()  # a verb or anything else ends the phrase
        if _can_be(tok, "VERB"):
            finite, verb_at, verbs = True, i, verbs + 1
    close()
    # "what colour ...", "reaching for a piece": no "of" came to resolve them
    return [p for p in phrases if p.head not in ATTRIBUTES and p.head not in GENERIC]


PLURAL_DETERMINERS = _words("these those several many few both some all most")
SUBJECT_PRONOUNS = _words("he she it they we i you")
CLAUSE_ENDS = _words("while whereas although because but which who that as when where")


def _inflected(tok: str) -> bool:
    """A third-person verb form ("sits", "covers")."""
    lemmas = _pos(tok).get("VERB")
    return bool(lemmas) and lemmas[0] != tok and tok.endswith("s")


def _predicate_adjective(tok: str, tokens: list[str], j: int) -> bool:
    """An adjective, colour, material or number after "is" ("is red", "are wooden", "is bright and round")."""
    if tok in ("and", ","):
        return j + 1 < len(tokens) and _predicate_adjective(tokens[j + 1], tokens, j + 1)
    return tok in COLOURS or tok in MATERIALS or tok in NUMBERS or tok.isdigit() or (
        _can_be(tok, "ADJ") and not _can_be(tok, "VERB")
    )


CLOSED = PREPOSITIONS | AUXILIARIES | WH_WORDS | PRONOUNS | CONJUNCTIONS | DETERMINERS


def _modifier_like(tok: str) -> bool:
    """A colour, material, number or adjective that can go on a run of modifiers ("small, silver", "red and")."""
    if not tok or not tok[0].isalnum() or tok in CLOSED:
        return False
    if tok in COLOURS or tok in MATERIALS or tok in NUMBERS:
        return True
    return _can_be(tok, "ADJ") or _verb_form(tok) or ("-" in tok and _hyphen_modifier(tok))


def _hyphen_modifier(tok: str) -> bool:
    """A hyphenated word that describes rather than names: its last part is an adjective, a participle or a
    particle ("heart-shaped", "half-chopped", "needle-like", "face-down", "rolled-up", "blue-green")."""
    last = tok.rsplit("-", 1)[-1]
    if last in ("like", "down", "up", "out", "off", "in", "on", "over", "free", "sized", "style"):
        return True
    if last in COLOURS or last in MATERIALS:
        return True
    pos = _pos(last)
    return bool(pos) and ("NOUN" not in pos or _verb_form(last))


def _nounable(tok: str) -> bool:
    if not tok or not tok[0].isalnum() or tok in CLOSED:
        return False
    return " " in tok or _can_be(tok, "NOUN") or _is_unknown(tok)


def _boundary(tok: str) -> bool:
    return not tok or tok in PREPOSITIONS or tok in AUXILIARIES or tok in CONJUNCTIONS or not tok[0].isalnum()


def _verb_form(word: str) -> bool:
    """-ing / -ed forms a dictionary knows as inflected verbs ("riding", "topped"; not "bed")."""
    if " " in word or not word.endswith(("ing", "ed")):
        return False
    lemmas = _pos(word).get("VERB")
    return bool(lemmas) and lemmas[0] != word


def _verb_after(subject_plural: bool, word: str, nxt: str, after: str = "") -> bool:
    """Whether a noun-or-verb word after a noun is that noun's verb: it agrees with it in number, or a determiner
    follows it. Otherwise it is a compound ("dog bed")."""
    if " " in word or not _can_be(word, "VERB") or nxt in AUXILIARIES:  # "the dog beds are": the verb follows
        return False
    if _can_be(nxt, "VERB") and nxt not in PREPOSITIONS and after in DETERMINERS:  # "model ships crowd the shelf"
        return False
    if nxt in DETERMINERS and nxt not in ("that", "this"):
        return True
    verb_lemma = _pos(word).get("VERB", (word,))[0]
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


# --------------------------------------------------------------------------------------------- the question
@dataclass
class Focus:
    phrase: str | None  # the question's own focus phrase, or None when it is in the answer
    references: frozenset[str]  # the question's phrases that are only its reference (demoted)
    doing: bool = False  # "what is X doing": X, unless the answer's verb has an object (then that object)


_WH_AUX = re.compile(r"^\s*(?:what|which|who)\s+(?:(\w+)\s+)?(?:is|are|was|were|'s|does|do|did)\s+(\S+)")
_IMPERATIVE = _words("describe give tell show list name identify explain provide look write summarize summarise")


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
    if wh and _pos(wh.group(1)).get("NOUN") and wh.group(1) not in AUXILIARIES | PRONOUNS | DETERMINERS:
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


_DISPLAY_PARTICIPLES = _words(
    "printed written drawn painted displayed shown engraved embroidered stamped labelled labeled carved"
)
_DISPLAY_VERBS = _words("say says read reads show shows display displays spell spells indicate indicates")


def _asks_elsewhere(q: str) -> bool:
    """Whether the question asks for an object it does not name: "what is on the table", "what is mounted on",
    "what is the girl holding", "what's this", "who is ...": its own phrases are the reference."""
    if q.startswith("who"):
        return True
    first = re.match(r"^\s*(?:what|which)\s+(\w+)", q)
    verb = first.group(1) if first else ""
    if verb not in AUXILIARIES and _can_be(verb, "VERB") and _pos(verb)["VERB"][0] != verb:
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
    predicate = not _can_be(word, "NOUN") or (bool(rest) and rest[0] in PREPOSITIONS)
    if _can_be(word, "ADJ") and word not in DETERMINERS and predicate:
        return True  # "what is visible in the corner"
    if word in _DISPLAY_PARTICIPLES:
        return False  # "what is printed on the mug": what is printed is seen on the mug, its region
    if _verb_form(word) or _participle(word):
        return True  # "what is mounted above the stove", "what is standing on the pad"
    # "what is the girl holding", "what does the boy throw": a verb after the subject
    # After the subject's first word ("the girl holding"; not "the heading at the top"): "doing" too
    verbs = [w for w in rest[:5] if _verb_form(w)]
    if word in DETERMINERS and rest and verbs and verbs[0] == rest[0]:
        verbs = verbs[1:]  # "what is the heading at the top": a noun after the determiner
    # "what is the man doing": the man (what he does is about him); "what is the girl holding": the answer's object
    return bool(verbs) and verbs[0] != "doing"


def _participle(word: str) -> bool:
    lemmas = _pos(word).get("VERB")
    return bool(lemmas) and lemmas[0] != word and not word.endswith("s")


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
