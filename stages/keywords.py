"""keywords: ranked key objects of each sample, from the question and both answers.

Backends:
- `lexicon` (default, no weights). `ranking.method: pair` (default): the noun phrases of the question, the
  chosen and the rejected answer (any noun, known to the lexicon or not: stages.key_phrases), ranked by what
  the answers disagree about, the question's focus and the chosen answer's subject, with the weights in
  `ranking.pair`. `ranking.method: graph`: object mentions found by longest match against the project's object
  vocabulary (`stages/data/object_lexicon.json`: LVIS v1 + COCO category names, synonyms and plurals), ranked by
  a graph ranking in the spirit of the paper's multipartite keyphrase ranking: one node per object category,
  edges between categories mentioned in the same text weighted by 1/token distance, and PageRank personalised
  by where and how early each category is mentioned (reads the question and the chosen answer only, `text`).
- `spacy`: the same rankings over an installed spaCy pipeline's parse: `pair` takes the noun phrases from its
  noun chunks, parts of speech and dependencies (stages.parsed_phrases) instead of the rules; `graph` ranks its
  noun chunks' lemmas. The pipeline needs a dependency parser.
- `llm`: a prompt from `prompts/` (with `{question}`, `{answer}` and `{rejected}`: the bundled one asks for what
  the two answers disagree about, then the question's object) sent to an OpenAI-compatible endpoint or a local
  Hugging Face causal LM; the reply must be a JSON list of phrases, anything else quarantines the row.

Output: `key_phrases` (best first, at most `top_k`, and only those scoring at least `min_relative_score` of the
best), `key_phrase_scores` (summing to 1 over all candidates)
and `key_phrase_sources` (per phrase, what it scored by: `question`, `contrast`, `answer`, joined by `+`; the
graph ranking and the llm backend record `graph` and `llm`). A row with no object mention gets empty lists;
`perturb` then takes its fallback path.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from mfpo.models import missing_model_dir
from pipeline.errors import PipelineError, RowError
from pipeline.registry import register
from pipeline.stage import RowStage, StageConfig
from pipeline.strict import StrictModel
from stages.common import FLOATS_TYPE, STRINGS_TYPE, missing_package, require
from stages.key_lexicon import singular
from stages.key_objects import Weights, rank_pair
from stages.key_phrases import Phrase
from stages.llm import LlmClient, LlmConfig, load_template
from stages.parsed_phrases import parsed_phrases

LEXICON_PATH = Path(str(resources.files("stages") / "data" / "object_lexicon.json"))  # package data
_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


class PairWeightsConfig(StrictModel):
    """How much each kind of evidence counts in the `pair` ranking (stages.key_objects.Weights)."""

    question: float = Field(4.0, description="The question's focus.")
    contrast: float = Field(3.0, description="Named by the chosen answer, not the rejected one (or described apart).")
    rejected_only: float = Field(0.5, description="Named only by the rejected answer.")
    answer: float = Field(2.0, description="The chosen answer's first phrase; the k-th scores answer / k.")
    mention: float = Field(1.0, description="Named by the question, not as its reference.")
    reference: float = Field(-2.0, description="The question's reference, when its object is in the answer.")


class RankingConfig(StrictModel):
    method: Literal["pair", "graph"] = Field("pair", description="pair: the whole preference pair; graph: PageRank.")
    pair: PairWeightsConfig = Field(default_factory=PairWeightsConfig)
    damping: float = Field(0.85, gt=0, lt=1, description="PageRank damping factor.")
    position_weight: float = Field(1.0, ge=0, description="Boost for early mentions: w / (1 + token index).")
    # The paper ranks the chosen answer's keyphrases; the question names the object too, but often
    # only generically ("What is on the table?"), so its mentions count half by default.
    question_weight: float = Field(0.5, ge=0, description="Weight of mentions in the question.")
    answer_weight: float = Field(1.0, ge=0, description="Weight of mentions in the chosen answer.")


class LexiconConfig(StrictModel):
    path: str | None = Field(None, description="A lexicon JSON of your own; default: the bundled one.")
    extra_terms: list[str] = Field(default_factory=list, description="More object names to match.")
    ignore: list[str] = Field(
        default_factory=lambda: ["top", "side", "back", "front", "picture", "image", "photo", "color", "colour"],
        description="Words never taken as objects on their own (positions, the picture itself).",
    )


class KeywordsConfig(StageConfig):
    backend: Literal["lexicon", "spacy", "llm"] = "lexicon"
    text: Literal["question", "chosen", "both"] = Field("both", description="Which text the objects come from.")
    top_k: int = Field(3, ge=1, le=32)
    min_relative_score: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Phrases scoring under this fraction of the top phrase's score are not passed on: ground boxes "
        "the key object and only the phrases close to it, not always top_k (0: always top_k).",
    )
    ranking: RankingConfig = Field(default_factory=RankingConfig)
    lexicon: LexiconConfig = Field(default_factory=LexiconConfig)
    spacy_model: str = Field("en_core_web_sm", description="spaCy pipeline name (spacy backend).")
    llm: LlmConfig = Field(default_factory=LlmConfig)

    def fingerprint_fields(self) -> dict[str, Any]:
        # How patiently the endpoint is called changes which rows wait for a resume, not any row's result.
        return self.model_dump(mode="json", exclude={"resources": True, "llm": {"retries", "retry_wait_s"}})


@dataclass(frozen=True)
class Mention:
    phrase: str  # canonical name of the object
    segment: int  # 0 = question, 1 = chosen answer
    position: int  # token index within the segment


def spacy_pipeline_version(name: str) -> str | None:
    """The spaCy pipeline's `lang_name-version` (a pipeline folder's meta.json, or an installed package's
    version), or None when neither is there."""
    try:
        from spacy import util
    except ImportError:  # check() names the install line
        return None
    folder = Path(name)
    if (folder / "meta.json").is_file():
        meta = util.get_model_meta(folder)
        return f"{meta['lang']}_{meta['name']}-{meta['version']}"
    if util.is_package(name):
        return f"{name}-{util.get_package_version(name)}"
    return None


# ------------------------------------------------------------------------------------------ lexicon
def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@lru_cache(maxsize=4)
def load_lexicon(path: str, extra: tuple[str, ...], ignore: tuple[str, ...]) -> dict[tuple[str, ...], str]:
    """Surface form (token tuple) -> canonical object name."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    table: dict[tuple[str, ...], str] = {}
    ignored = {tuple(tokenize(w)) for w in ignore}
    for cat in data["categories"]:
        forms = list(cat.get("synonyms", [])) + list(cat.get("plurals", []))
        canonical = " ".join(tokenize(cat["synonyms"][0] if cat.get("synonyms") else cat["name"]))
        for form in forms:
            key = tuple(tokenize(form))
            if key and key not in ignored:
                table.setdefault(key, canonical)  # first category to claim a form keeps it
    for term in extra:
        key = tuple(tokenize(term))
        if key:
            table[key] = " ".join(key)
    return table


def lexicon_mentions(texts: list[str], table: dict[tuple[str, ...], str]) -> list[Mention]:
    longest = max((len(k) for k in table), default=1)
    mentions: list[Mention] = []
    for seg, text in enumerate(texts):
        tokens = tokenize(text)
        found: list[tuple[int, int, str]] = []  # start, end, phrase
        i = 0
        while i < len(tokens):
            for n in range(min(longest, len(tokens) - i), 0, -1):
                phrase = table.get(tuple(tokens[i : i + n]))
                if phrase is not None:
                    found.append((i, i + n, phrase))
                    i += n
                    break
            else:
                i += 1
        for k, (start, end, phrase) in enumerate(found):
            # Noun-noun compounds ("dog bed", "pizza box"): the last noun is the object, the first a modifier.
            if k + 1 < len(found) and found[k + 1][0] == end:
                continue
            mentions.append(Mention(phrase, seg, start))
    return mentions


def head_object(text: str, table: dict[tuple[str, ...], str]) -> str:
    """The object a short label names: "coffee cup" -> "cup", "kitties" -> "cat"; a phrase the lexicon does not
    know by its last word, singular ("service ribbons" -> "ribbon", "impact crater" -> "crater")."""
    mentions = lexicon_mentions([text, ""], table)
    if mentions:
        return mentions[-1].phrase
    words = tokenize(text)
    return singular(words[-1]) if words else ""


def rank(mentions: list[Mention], cfg: RankingConfig) -> list[tuple[str, float]]:
    """Graph ranking of the mentioned objects: PageRank over co-occurrence, personalised by position."""
    import networkx as nx

    if not mentions:
        return []
    seg_weight = (cfg.question_weight, cfg.answer_weight)
    prior: dict[str, float] = defaultdict(float)
    first: dict[str, tuple[int, int]] = {}
    graph = nx.Graph()
    for m in mentions:
        prior[m.phrase] += seg_weight[m.segment] * (1.0 + cfg.position_weight / (1.0 + m.position))
        first.setdefault(m.phrase, (m.segment, m.position))
        graph.add_node(m.phrase)
    for a in mentions:
        for b in mentions:
            if a.phrase < b.phrase and a.segment == b.segment:
                w = 1.0 / max(1, abs(a.position - b.position))
                old = graph.get_edge_data(a.phrase, b.phrase, {"weight": 0.0})["weight"]
                graph.add_edge(a.phrase, b.phrase, weight=old + w)
    if sum(prior.values()) == 0:
        prior = defaultdict(float, dict.fromkeys(prior, 1.0))
    scores = nx.pagerank(
        graph, alpha=cfg.damping, personalization=dict(prior), weight="weight", tol=1e-9, max_iter=1000
    )
    total = sum(scores.values())
    ranked = sorted(scores.items(), key=lambda kv: (-round(kv[1], 9), first[kv[0]], kv[0]))
    return [(p, round(s / total, 6)) for p, s in ranked]


# ------------------------------------------------------------------------------------------ llm
def parse_phrase_list(reply: str) -> list[str]:
    """The first JSON list of strings in a model reply; RowError when there is none."""
    match = re.search(r"\[[^\[\]]*\]", reply, flags=re.S)
    if match is None:
        raise RowError(f"keywords: model reply has no JSON list: {reply.strip()[:80]!r}")
    try:
        items = json.loads(match.group(0))
    except json.JSONDecodeError:
        raise RowError(f"keywords: model reply is not valid JSON: {match.group(0)[:80]!r}") from None
    phrases = [" ".join(tokenize(i)) for i in items if isinstance(i, str)]
    if len(phrases) != len(items) or not all(phrases):
        raise RowError(f"keywords: model reply must be a list of object names: {match.group(0)[:80]!r}")
    return list(dict.fromkeys(phrases))


# ------------------------------------------------------------------------------------------ the stage
@register
class Keywords(RowStage):
    name: ClassVar[str] = "keywords"
    Config = KeywordsConfig
    version: ClassVar[int] = 2  # 2: the pair ranking (default), open-vocabulary phrases, key_phrase_sources
    inputs: ClassVar[tuple[str, ...]] = ("question", "chosen", "rejected")
    outputs: ClassVar[tuple[str, ...]] = ("key_phrases", "key_phrase_scores", "key_phrase_sources")
    config: KeywordsConfig

    def check(self) -> list[str]:
        cfg = self.config
        if cfg.backend == "spacy":
            return missing_package("spacy", "'mfpo-pipeline[spacy]'")
        if cfg.backend == "llm" and cfg.llm.provider == "huggingface":
            return missing_model_dir(cfg.llm.model, "stages.keywords.llm.model")
        return []

    def setup(self) -> None:
        cfg = self.config
        if cfg.backend in ("lexicon", "spacy"):
            lex = cfg.lexicon
            self.table = load_lexicon(lex.path or str(LEXICON_PATH), tuple(lex.extra_terms), tuple(lex.ignore))
            self.multiword = frozenset(k for k in self.table if len(k) > 1)  # "hot dog" is one noun
            self.objects = frozenset(k[0] for k in self.table if len(k) == 1)  # "boots" is a noun, not a verb
            self.weights = Weights(**cfg.ranking.pair.model_dump())
        if cfg.backend == "spacy":
            spacy = require("spacy", "'mfpo-pipeline[spacy]' and a pipeline, e.g. pip install en_core_web_sm")
            try:
                self.nlp = spacy.load(cfg.spacy_model)  # an installed package's name or a pipeline folder
            except OSError as err:
                raise PipelineError(
                    f"stages.keywords.spacy_model: spaCy pipeline {cfg.spacy_model!r} is not installed; "
                    f"install it (python -m spacy download {cfg.spacy_model}) or use backend: lexicon"
                ) from err
            if "parser" not in self.nlp.pipe_names:  # noun chunks, owners and verbs' objects come from the parse
                raise PipelineError(
                    f"stages.keywords.spacy_model: spaCy pipeline {cfg.spacy_model!r} has no dependency parser "
                    f"(its components: {', '.join(self.nlp.pipe_names) or 'none'}); use one that has "
                    "(en_core_web_sm, en_core_web_trf) or backend: lexicon"
                )
        elif cfg.backend == "llm":
            self.template = load_template(cfg.llm.prompt, "stages.keywords.llm.prompt")
            self.llm = LlmClient(cfg.llm, "stages.keywords.llm", "keywords")

    def fingerprint_extra(self) -> Any:
        from pipeline.storage import file_sha256

        extra: dict[str, Any] = {}
        if self.config.backend in ("lexicon", "spacy") and self.config.lexicon.path is None:
            extra["lexicon"] = file_sha256(LEXICON_PATH)
        if self.config.backend == "spacy":
            # Another version of the pipeline parses otherwise; 2: the pair ranking over its parse.
            extra["spacy"] = {"pipeline": spacy_pipeline_version(self.config.spacy_model), "phrases": 2}
        return extra or None

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        return pa.schema(
            [
                ("sample_id", pa.string()),
                ("key_phrases", STRINGS_TYPE),
                ("key_phrase_scores", FLOATS_TYPE),
                ("key_phrase_sources", STRINGS_TYPE),
            ]
        )

    def texts(self, row: dict[str, Any]) -> list[str]:
        return {
            "question": [row["question"], ""],
            "chosen": ["", row["chosen"]],
            "both": [row["question"], row["chosen"]],
        }[self.config.text]

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        texts = self.texts(row)
        sources: list[str] | None = None
        if self.config.backend in ("lexicon", "spacy") and self.config.ranking.method == "pair":
            ranked_pair = rank_pair(
                row["question"],
                row["chosen"],
                row["rejected"],
                self.weights,
                self.multiword,
                self.objects,
                phrases=self._parsed_phrases if self.config.backend == "spacy" else None,
            )
            positive = sum(max(r.score, 0.0) for r in ranked_pair)
            ranked = [
                (r.phrase, round(max(r.score, 0.0) / positive if positive else 1.0 / len(ranked_pair), 6))
                for r in ranked_pair
            ]
            sources = ["+".join(r.sources) or "reference" for r in ranked_pair]
        elif self.config.backend == "llm":
            prompt = self.template.format(question=texts[0], answer=texts[1], rejected=row["rejected"])
            reply = self.llm.complete(prompt)
            phrases = parse_phrase_list(reply)[: self.config.top_k]
            weights = [1.0 / (i + 1) for i in range(len(phrases))]
            ranked = [(p, round(w / sum(weights), 6)) for p, w in zip(phrases, weights, strict=True)]
        elif self.config.backend == "spacy":
            ranked = rank(self._noun_chunks(texts), self.config.ranking)
        else:
            ranked = rank(lexicon_mentions(texts, self.table), self.config.ranking)
        best = ranked[0][1] if ranked else 0.0
        top = [(p, s) for p, s in ranked[: self.config.top_k] if s >= self.config.min_relative_score * best and s > 0]
        top = top or ranked[:1]
        default = "llm" if self.config.backend == "llm" else "graph"
        return {
            "key_phrases": [p for p, _ in top],
            "key_phrase_scores": [s for _, s in top],
            "key_phrase_sources": (sources or [default] * len(top))[: len(top)],
        }

    def _parsed_phrases(self, text: str) -> list[Phrase]:
        return parsed_phrases(self.nlp(text), self.multiword)

    def _noun_chunks(self, texts: list[str]) -> list[Mention]:
        mentions = []
        for seg, text in enumerate(texts):
            doc = self.nlp(text)
            for chunk in doc.noun_chunks:
                if chunk.root.pos_ == "PRON":
                    continue
                words = [t.lemma_.lower() for t in chunk if t.pos_ in ("NOUN", "PROPN", "ADJ")]
                if words:
                    mentions.append(Mention(" ".join(words), seg, chunk.start))
        return mentions
