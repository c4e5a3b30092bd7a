"""The key-object rules' vocabulary (stages.key_phrases, stages.parsed_phrases, stages.key_objects read it): the
closed word classes, the lists that decide what is never an object (colour, position and generic words) or
resolves to its "of" complement (collectives, containers, parts, attributes), and what a word can be.

Written by hand because no installable library does this without a downloaded model: spaCy and NLTK need a
pipeline or corpus fetched at run time. `lemminflect` (its dictionary ships in the wheel) says which parts of
speech a word can take and gives its singular; the rules in stages.key_phrases decide among them from context.
"""

from __future__ import annotations

from functools import lru_cache


def word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Closed classes: written out because they are small and fixed; everything open-class comes from lemminflect.
DETERMINERS = word_set(
    "a an the this that these those some any each every several many few both either neither another other "
    "no his her their its my your our whose such all most"
)
PREPOSITIONS = word_set(
    "on in at of with beside besides near under above behind by from into onto over between among across along "
    "around against through toward towards inside outside underneath below beneath beyond atop upon within "
    "without next to for like about during via past up down off out than as"
)
AUXILIARIES = word_set(
    "is are was were be been being am has have had do does did can could will would may might shall should must 're 're"
)
WH_WORDS = word_set("what which who whom whose where when why how")
PRONOUNS = word_set(
    "it its they them he him she her we us i me you there here one ones itself themselves himself herself "
    "this that something anything nothing someone everyone"
)
CONJUNCTIONS = word_set("and or but nor so yet while whereas although because if then")
ADVERBS = word_set("very quite rather too also just only really slightly mostly partly fully almost not")
NUMBERS = word_set(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen twenty thirty "
    "dozens hundred hundreds single double"
)
COLOURS = word_set(
    "red orange yellow green blue purple violet pink brown black white grey gray silver gold golden beige tan "
    "cream ivory navy teal turquoise cyan magenta maroon crimson scarlet lime olive peach salmon coral lemon "
    "cherry chocolate amber bronze copper lavender lilac mauve khaki charcoal burgundy rust mint emerald ruby "
    "jade indigo aqua blond blonde dark light bright pale colorful colourful multicolored multicoloured"
)
# Colour words that also name things ("an orange", "grilled salmon"); every other colour word is never an object.
COLOUR_NOUNS = word_set(
    "orange lime olive peach salmon coral lemon cherry chocolate cream ivory amber bronze copper gold silver "
    "lavender lilac mint emerald ruby jade rust charcoal burgundy navy indigo turquoise"
)
MATERIALS = word_set(
    "wooden wood metal metallic steel iron stone glass plastic leather cotton wool woolen woollen silk paper "
    "cardboard ceramic porcelain brick concrete marble granite rubber denim velvet straw wicker bamboo "
    "aluminum aluminium tin clay canvas fur lace linen nylon"
)
POSITIONS = word_set(
    "left right top bottom side front back middle center centre foreground background corner edge rear upper "
    "lower far near distance inside outside surface part half area portion end row"
)
GENERIC = word_set(
    "picture image photo photograph scene view shot frame object thing item stuff kind type sort lot lots "
    "number way color colour shape size material pattern texture brand name detail details style feature "
    "structure figure element something anything image's photo's subject focus description overview summary "
    "detail details piece pieces"
)
# "the X of Y": X names a property of Y, so Y is the object.
ATTRIBUTES = word_set(
    "color colour shape size material pattern texture brand name breed flavor flavour kind type sort style "
    "number amount height length width weight age model make condition"
)
# "a X of Y": X measures or groups Y, so Y is the object (a container, "a cup of tea", is an object itself).
COLLECTIVES = word_set(
    "pair couple flock herd pack school swarm group crowd bunch bouquet cluster slice piece chunk sea blanket "
    "carpet sheet layer stack pile heap line set series lot lots variety array assortment collection handful "
    "bundle team family dozen string mass cloud field forest wall range plate bowl cup glass tangle mound patch "
    "strip clump sprinkle dusting splash swirl ring wedge square scoop bar loaf sprig stick dollop pat drop "
    "sliver roll"
) - {"plate", "bowl", "cup", "glass", "wall"}
# "a bowl of ramen", "the handle of a racket": what the container holds and what the part belongs to name the
# object (their regions overlap); a container alone ("a bowl") is an object of its own.
CONTAINERS = word_set(
    "bowl plate cup glass mug jar bottle box bag basket crate tray pot pan can carton tin vase bucket sack "
    "packet pack case dish platter"
)
OBJECT_PARTS = word_set("handle lid rim tip base stem blade screen cover leg spout strap sole cap knob")
# Nouns whose plural is the object's name ("glasses" are not two glasses), and irregular plurals.
PLURAL_NOUNS = word_set(
    "people men women children police cattle sheep deer fish clothes geese mice teeth glasses eyeglasses sunglasses "
    "scissors pants trousers jeans shorts binoculars goggles tongs pliers headphones earphones pajamas overalls"
)
# "what X ...", "which X ...": X names a category, which the answer's object belongs to.
CATEGORIES = word_set(
    "animal animals vehicle vehicles utensil utensils drink drinks beverage food foods fruit fruits vegetable "
    "vegetables object objects item items thing things tool tools device devices appliance appliances furniture "
    "instrument instruments toy toys plant plants sport sports game dish dishes meal clothing garment garments "
    "accessory accessories building buildings structure structures creature creatures breed species kind type "
    "sort brand animal's piece pieces equipment gadget machine container shape"
)
# Fixed adverbial phrases whose nouns name nothing in the picture ("lies face down", "turned upside down").
ADVERBIAL_PAIRS = frozenset({("face", "down"), ("face", "up"), ("upside", "down"), ("inside", "out"), ("side", "by")})

PLURAL_DETERMINERS = word_set("these those several many few both some all most")
SUBJECT_PRONOUNS = word_set("he she it they we i you")
CLAUSE_ENDS = word_set("while whereas although because but which who that as when where")

CLOSED = PREPOSITIONS | AUXILIARIES | WH_WORDS | PRONOUNS | CONJUNCTIONS | DETERMINERS


@lru_cache(maxsize=65536)
def parts_of_speech(word: str) -> dict[str, tuple[str, ...]]:
    """The parts of speech a word can take, with its lemmas (lemminflect's dictionary)."""
    import lemminflect

    return dict(lemminflect.getAllLemmas(word))


def singular(word: str) -> str:
    if " " in word:  # "teddy bears" -> "teddy bear"
        *front, last = word.split(" ")
        return " ".join([*front, singular(last)])
    if word in PLURAL_NOUNS - {"geese", "mice", "teeth", "men", "women", "children"}:
        return word
    lemmas = parts_of_speech(word).get("NOUN")
    if lemmas:
        verbs = parts_of_speech(word).get("VERB", ())
        return next((lemma for lemma in lemmas if lemma not in verbs), lemmas[0])  # "leaves" -> leaf, not leave
    import lemminflect

    oov = lemminflect.getAllLemmasOOV(word, "NOUN").get("NOUN")
    return oov[0] if oov else word


def is_plural(word: str) -> bool:
    return word in PLURAL_NOUNS or singular(word) != word


def can_be(word: str, pos: str) -> bool:
    return pos in parts_of_speech(word)


def is_unknown(word: str) -> bool:
    """A word the dictionary does not know (sundial-like rarities, "space-suit"): taken as a noun."""
    return not parts_of_speech(word) and word.replace("-", "").isalpha() and len(word) > 2


def inflected(tok: str) -> bool:
    """A third-person verb form ("sits", "covers")."""
    lemmas = parts_of_speech(tok).get("VERB")
    return bool(lemmas) and lemmas[0] != tok and tok.endswith("s")


def verb_form(word: str) -> bool:
    """-ing / -ed forms a dictionary knows as inflected verbs ("riding", "topped"; not "bed")."""
    if " " in word or not word.endswith(("ing", "ed")):
        return False
    lemmas = parts_of_speech(word).get("VERB")
    return bool(lemmas) and lemmas[0] != word


def participle(word: str) -> bool:
    lemmas = parts_of_speech(word).get("VERB")
    return bool(lemmas) and lemmas[0] != word and not word.endswith("s")
