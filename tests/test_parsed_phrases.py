"""The keywords stage's spacy backend ranks by the same pair ranking as the default: noun phrases read from a
dependency parse equal those the rules read from the words, and a real spaCy pipeline (random weights, saved and
loaded by path) runs through the stage with that ranking."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pyarrow as pa
import pytest
from stage_runner import build_stage

from pipeline.errors import PipelineError
from stages.key_lexicon import singular
from stages.key_objects import rank_pair
from stages.key_phrases import noun_phrases
from stages.parsed_phrases import parsed_phrases

spacy = pytest.importorskip("spacy")

# Gold parses in spaCy's English scheme (Universal POS, ClearNLP labels): text, words, pos, heads, deps.
PARSES = {
    "What is the dog holding?": (
        "What is the dog holding ?",
        "PRON AUX DET NOUN VERB PUNCT",
        [4, 4, 3, 4, 4, 4],
        "dobj aux det nsubj ROOT punct",
    ),
    "The dog is holding a red frisbee in its mouth.": (
        "The dog is holding a red frisbee in its mouth .",
        "DET NOUN AUX VERB DET ADJ NOUN ADP PRON NOUN PUNCT",
        [1, 3, 3, 3, 6, 6, 3, 3, 9, 7, 3],
        "det nsubj aux ROOT det amod dobj prep poss pobj punct",
    ),
    "The dog is holding a blue ball in its mouth.": (
        "The dog is holding a blue ball in its mouth .",
        "DET NOUN AUX VERB DET ADJ NOUN ADP PRON NOUN PUNCT",
        [1, 3, 3, 3, 6, 6, 3, 3, 9, 7, 3],
        "det nsubj aux ROOT det amod dobj prep poss pobj punct",
    ),
    "What colour are the cat's eyes?": (
        "What colour are the cat 's eyes ?",
        "DET NOUN AUX DET NOUN PART NOUN PUNCT",
        [1, 2, 2, 4, 6, 4, 2, 2],
        "det attr ROOT det poss case nsubj punct",
    ),
    "The cat's eyes are green.": (
        "The cat 's eyes are green .",
        "DET NOUN PART NOUN AUX ADJ PUNCT",
        [1, 3, 1, 4, 4, 4, 4],
        "det poss case nsubj ROOT acomp punct",
    ),
    "The cat's eyes are blue.": (
        "The cat 's eyes are blue .",
        "DET NOUN PART NOUN AUX ADJ PUNCT",
        [1, 3, 1, 4, 4, 4, 4],
        "det poss case nsubj ROOT acomp punct",
    ),
    "What is flying over the lake?": (
        "What is flying over the lake ?",
        "PRON AUX VERB ADP DET NOUN PUNCT",
        [2, 2, 2, 2, 5, 3, 2],
        "nsubj aux ROOT prep det pobj punct",
    ),
    "A flock of geese is flying over the lake.": (
        "A flock of geese is flying over the lake .",
        "DET NOUN ADP NOUN AUX VERB ADP DET NOUN PUNCT",
        [1, 5, 1, 2, 5, 5, 5, 8, 6, 5],
        "det nsubj prep pobj aux ROOT prep det pobj punct",
    ),
    "A plane is flying over the lake.": (
        "A plane is flying over the lake .",
        "DET NOUN AUX VERB ADP DET NOUN PUNCT",
        [1, 3, 3, 3, 3, 6, 4, 3],
        "det nsubj aux ROOT prep det pobj punct",
    ),
    "A man in an orange spacesuit eats a hot dog.": (
        "A man in an orange spacesuit eats a hot dog .",
        "DET NOUN ADP DET ADJ NOUN VERB DET ADJ NOUN PUNCT",
        [1, 6, 1, 5, 5, 2, 6, 9, 9, 6, 6],
        "det nsubj prep det amod pobj ROOT det amod dobj punct",
    ),
}
PAIRS = [  # question, chosen, rejected, the key object
    ("What is the dog holding?", "The dog is holding a red frisbee in its mouth.", "The dog is holding a blue ball in its mouth.", "frisbee"),  # noqa: E501
    ("What colour are the cat's eyes?", "The cat's eyes are green.", "The cat's eyes are blue.", "eye"),
    ("What is flying over the lake?", "A flock of geese is flying over the lake.", "A plane is flying over the lake.", "goose"),  # noqa: E501
]


@pytest.fixture(scope="module")
def lexicon_stage():
    return build_stage("keywords", {})  # the default backend: its lexicon's multi-word names and objects


@cache
def _vocab():
    return spacy.blank("en").vocab  # English: its noun-chunk rules


def _doc(text: str):
    from spacy.tokens import Doc

    words, pos, heads, deps = PARSES[text]
    return Doc(_vocab(), words=words.split(), pos=pos.split(), heads=heads, deps=deps.split())


def _fields(phrases):
    return [(p.text, p.head, p.owner, sorted(p.modifiers), p.position, p.after_verb) for p in phrases]


@pytest.mark.parametrize("text", list(PARSES))
def test_phrases_from_a_parse_equal_those_of_the_rules(text, lexicon_stage):
    """The compound with its singular head, the modifiers (a predicate's adjective too), the owner of a part, the
    verb a phrase is the object of, a collective resolved to its complement, a colour as a modifier and a known
    multi-word name: the same from spaCy's parse as from the words."""
    parsed = parsed_phrases(_doc(text), lexicon_stage.multiword)
    assert parsed, text
    assert _fields(parsed) == _fields(noun_phrases(text, lexicon_stage.multiword, lexicon_stage.objects))


@pytest.mark.parametrize(("question", "chosen", "rejected", "key"), PAIRS)
def test_the_pair_ranking_over_a_parse_finds_the_key_object(question, chosen, rejected, key, lexicon_stage):
    parsed = rank_pair(question, chosen, rejected, phrases=lambda t: parsed_phrases(_doc(t), lexicon_stage.multiword))
    rules = rank_pair(question, chosen, rejected, multiword=lexicon_stage.multiword, objects=lexicon_stage.objects)
    assert parsed[0].phrase == key
    assert [(r.phrase, r.score, r.sources) for r in parsed] == [(r.phrase, r.score, r.sources) for r in rules]


def _random_pipeline(path: Path, parser: bool = True) -> Path:
    """A spaCy English pipeline of the real components (morphologizer, dependency parser) with random weights."""
    nlp = spacy.blank("en")
    tags = nlp.add_pipe("morphologizer")
    for pos in ("NOUN", "PROPN", "VERB", "AUX", "DET", "ADJ", "ADP", "PRON", "NUM", "PART", "PUNCT"):
        tags.add_label(f"POS={pos}")
    if parser:
        deps = nlp.add_pipe("parser")
        for label in ("ROOT", "nsubj", "dobj", "pobj", "prep", "det", "amod", "compound", "poss", "case", "aux"):
            deps.add_label(label)
    nlp.initialize()
    nlp.to_disk(path)
    return path


def test_the_spacy_backend_runs_the_pair_ranking_on_a_pipeline_folder(tmp_path):
    pipeline = _random_pipeline(tmp_path / "nlp")
    rows = pa.table(
        {
            "sample_id": [f"s{i}" for i in range(len(PAIRS))],
            "question": [p[0] for p in PAIRS],
            "chosen": [p[1] for p in PAIRS],
            "rejected": [p[2] for p in PAIRS],
        }
    )
    stage = build_stage("keywords", {"backend": "spacy", "spacy_model": str(pipeline)})
    assert stage.fingerprint_extra()["spacy"] == {"pipeline": "en_pipeline-0.0.0", "phrases": 2}
    pair = stage.process_batch(rows)
    assert pair.rejected == []
    out = pair.table.to_pylist()
    assert len(out) == len(PAIRS)
    for row, (question, chosen, rejected, _) in zip(out, PAIRS, strict=True):
        words = {singular(w) for w in re.findall(r"[a-z]+", f"{question} {chosen} {rejected}".lower())}
        assert row["key_phrases"], row  # random parses still make noun chunks of the text's words
        assert all(set(p.split()) <= words for p in row["key_phrases"]), row
        for source in row["key_phrase_sources"]:  # the pair ranking's evidence, not the graph ranking's
            assert set(source.split("+")) <= {"question", "contrast", "answer", "reference"}, source
    graph = build_stage(
        "keywords", {"backend": "spacy", "spacy_model": str(pipeline), "ranking": {"method": "graph"}}
    ).process_batch(rows)
    assert {s for r in graph.table.to_pylist() for s in r["key_phrase_sources"]} <= {"graph"}


def test_a_pipeline_without_a_parser_is_refused_naming_the_key(tmp_path):
    pipeline = _random_pipeline(tmp_path / "tagger-only", parser=False)
    with pytest.raises(PipelineError, match=r"stages\.keywords\.spacy_model: .* has no dependency parser"):
        build_stage("keywords", {"backend": "spacy", "spacy_model": str(pipeline)})
