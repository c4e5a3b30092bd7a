"""The pair ranking's rules, one class of error each: colour and material words modify, verbs and metaphors are
not objects, measure and collective nouns resolve to their complement, the part beats its owner, a relation's
asked object beats its reference, the answers' disagreement counts, any noun is a candidate, and every phrase
says where its score came from."""

from __future__ import annotations

import pytest

from stages.key_objects import rank_pair
from stages.key_phrases import noun_phrases
from stages.keywords import LEXICON_PATH, LexiconConfig, load_lexicon


def _lexicon() -> tuple[frozenset, frozenset]:
    """What the keywords stage gives the rules: the bundled lexicon's multi-word names and one-word objects."""
    table = load_lexicon(str(LEXICON_PATH), (), tuple(LexiconConfig().ignore))
    return frozenset(k for k in table if len(k) > 1), frozenset(k[0] for k in table if len(k) == 1)


MULTIWORD, OBJECTS = _lexicon()


def _texts(text: str) -> list[str]:
    return [p.text for p in noun_phrases(text, MULTIWORD, OBJECTS)]


def _top(question: str, chosen: str, rejected: str, n: int = 1) -> list[str]:
    return [r.phrase for r in rank_pair(question, chosen, rejected, multiword=MULTIWORD, objects=OBJECTS)[:n]]


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("The astronaut wears an orange spacesuit.", ["astronaut", "spacesuit"]),  # colour: a modifier
        ("The car is orange.", ["car"]),  # colour as a predicate
        ("An orange sits next to a lime.", ["orange", "lime"]),  # colour words as objects, with determiners
        ("A stone wall runs past a wooden gate.", ["wall", "gate"]),  # materials modify
        ("Snow covers the hillside.", ["snow", "hillside"]),  # "covers" is the verb
        ("People line the street.", ["people", "street"]),  # "line" agrees with "people"
        ("The man waves.", ["man"]),
        ("A blanket of snow lies on the field.", ["snow", "field"]),  # collective -> complement
        ("A flock of birds flies over a sea of people.", ["bird", "people"]),
        ("A pair of shoes and a slice of pizza.", ["shoe", "pizza"]),
        ("The colour of the car is red.", ["car"]),  # attribute -> its object
        ("A plate topped with fries.", ["plate", "fry"]),  # "topped" is a verb
        ("A sleeping cat on a dog bed.", ["cat", "dog bed"]),  # compound: the text's own phrase, singular
        ("Two totem poles near a sundial.", ["totem pole", "sundial"]),  # outside any lexicon
        ("On the left side of the picture, a small, silver teaspoon.", ["teaspoon"]),  # positions, generic words
        ("She wears glasses.", ["glasses"]),  # a plural-only noun stays as it is
        # plural compounds in a clause that has its verb; a verb after an aside; a shade is not a thing
        ("She is wearing yellow rain boots, splashed with mud.", ["rain boot", "mud"]),
        ("A row of wheelie bins, green and black, stands by the road.", ["wheelie bin", "road"]),
        ("Plates, cups and bowls sit on the shelf.", ["plate", "cup", "bowl", "shelf"]),
        ("The curtains are a muted mustard yellow.", ["curtain"]),
        ("A plate topped with grilled salmon and asparagus spears.", ["plate", "salmon", "asparagus spear"]),
        ("A child's crayon drawing of a house.", ["child", "crayon drawing", "house"]),  # a gerund before "of"
        ("He is playing a grand piano, its lid propped open.", ["piano", "lid"]),
        ("She stirs a pot of soup while he watches.", ["soup"]),  # pronoun subjects' verbs; a container's content
        ("The dog runs along the beach and leaps to catch a frisbee.", ["dog", "beach", "frisbee"]),
        ("The plant's leaves are broad, which stand out.", ["plant", "leaf"]),
    ],
)
def test_noun_phrases(text: str, phrases: list[str]):
    assert _texts(text) == phrases


def test_the_part_is_owned():
    [dog, eye] = noun_phrases("The dog's eyes are brown.", MULTIWORD, OBJECTS)
    assert (dog.text, eye.text, eye.owner) == ("dog", "eye", "dog")


@pytest.mark.parametrize(
    ("question", "chosen", "rejected", "key"),
    [
        # the question's focus: attribute questions, the part before its owner, "how many"
        ("What colour is the car?", "The car parked by the tree is red.", "The car is blue.", "car"),
        ("What colour are the cat's eyes?", "The cat's eyes are green with round pupils.", "They are blue.", "eye"),
        ("How many birds are on the wire?", "Three birds sit on the wire.", "Five birds sit on the wire.", "bird"),
        # the object is in the answer: relations, actions, categories, "what is this"
        (
            "What is on the counter beside the sink?",
            "A silver toaster sits on the counter beside the sink.",
            "A blender sits on the counter beside the sink.",
            "toaster",
        ),
        ("What is the girl holding?", "The girl is holding a red umbrella.", "She holds a kite.", "umbrella"),
        ("What is the man riding?", "The man is riding a brown horse along the beach.", "A bicycle.", "horse"),
        ("What animal is on the sofa?", "A tabby cat is curled up on the sofa.", "A dog is on the sofa.", "cat"),
        ("What is this?", "This is a sundial in a garden.", "This is a clock on a wall.", "sundial"),
        ("What is the woman wearing on her head?", "She wears a nurse's cap.", "She wears a helmet.", "cap"),
        ("What surrounds the lake?", "Tall reeds ring the lake.", "A stone wall rings the lake.", "reed"),
        ("Which flag hangs by the door?", "The flag of Japan, white with a red disc.", "A blue banner.", "flag"),
        # "what is X doing": what X acts on, when its first verb has an object; else X
        ("What is the crane doing?", "The crane lifts a steel beam above the tower.", "It lowers a crate.", "beam"),
        ("What is the man doing?", "The man waves to a friend from the platform.", "He runs for the train.", "man"),
        (
            "What is the girl doing with the kite?",
            "She holds the string tight as the kite climbs above the dunes.",
            "She kneels on the sand.",
            "kite",
        ),
        # what is written or printed on a thing is seen on the thing
        ("What is printed on the coffee mug?", "The coffee mug has a cartoon fox on it.", "A slogan.", "coffee mug"),
        ("What does the sign say?", "The sign says OPEN in red letters.", "It says CLOSED.", "sign"),
        # the pair's contrast: what the answers disagree about
        (
            "Describe the image in detail.",
            "A man walks a dog across a park; a red kite flies above the trees.",
            "A man walks a dog across a park; a yellow balloon floats above the trees.",
            "kite",
        ),
    ],
)
def test_the_key_object_of_a_pair(question: str, chosen: str, rejected: str, key: str):
    assert _top(question, chosen, rejected) == [key]


def test_each_phrase_says_where_its_score_came_from():
    ranked = rank_pair("What colour is the bus?", "The bus is red, parked by a tree.", "The bus is yellow.")
    by_phrase = {r.phrase: r for r in ranked}
    assert by_phrase["bus"].sources == ["question", "contrast", "answer"]  # asked, described apart, the subject
    assert by_phrase["tree"].sources == ["contrast", "answer"]  # only the chosen answer names it
    assert ranked[0].phrase == "bus" and ranked[0].score > by_phrase["tree"].score
    reference = rank_pair("What is on the table?", "A laptop is on the table.", "A book.")
    assert reference[0].phrase == "laptop"
    assert {r.phrase: r.score for r in reference}["table"] < 0  # the relation's reference is demoted


def test_no_colour_position_generic_word_or_verb_is_a_phrase():
    text = (
        "In the background on the left of this picture, the scene shows a red object; snow covers the top, "
        "the man waves and people line the side of the image in blue and green."
    )
    assert _texts(text) == ["snow", "man", "people"]


def test_the_readme_example():
    """The worked example of the README's `keywords` section, number for number, through the stage."""
    import pyarrow as pa
    from stage_runner import build_stage

    question = "What is on the counter beside the sink?"
    chosen = "A chrome toaster sits on the counter beside the sink, next to a roll of paper towels."
    rejected = "A blender sits on the counter beside the sink, next to a roll of paper towels."
    ranked = rank_pair(question, chosen, rejected, multiword=MULTIWORD, objects=OBJECTS)
    assert [(r.phrase, r.score) for r in ranked] == [
        ("chrome toaster", 5.0),
        ("paper towel", 1.0),
        ("blender", 0.5),
        ("counter", -2.0),
        ("sink", -2.0),
    ]
    table = pa.table({"sample_id": ["1"], "question": [question], "chosen": [chosen], "rejected": [rejected]})
    [row] = build_stage("keywords", {}).process_batch(table).table.to_pylist()
    assert row["key_phrases"] == ["chrome toaster"] and row["key_phrase_sources"] == ["contrast+answer"]
