"""Accuracy of the keywords stage: does its first (or one of its first three) key phrase(s) name the key object?

    .venv/bin/python bench/keywords_accuracy.py                      # lexicon backend, the bundled labelled set
    .venv/bin/python bench/keywords_accuracy.py --backend spacy      # skipped with a note if spaCy is missing
    .venv/bin/python bench/keywords_accuracy.py --data held_out.jsonl --config '{"text": "chosen"}'
    # the committed stage, while the working tree holds a rewrite (the file name keeps both results apart):
    mkdir /tmp/head && git archive HEAD pipeline stages | tar -x -C /tmp/head
    .venv/bin/python bench/keywords_accuracy.py --code /tmp/head --name lexicon-head

The stage runs the way a worker runs it, through the project's own code: `get_stage("keywords")`, its
`Config.model_validate(...)`, a `StageContext`, `setup()` once, then `process_batch` on one Arrow table whose
columns are exactly `["sample_id", *stage.inputs]` (the labelled items carry question, chosen and rejected, so
whichever of them the stage declares is there). Only `process_batch` is timed (best of `--repeat`), on one
process and one thread: rows/s is the stage's own per-row cost, without Ray or start-up.

Data: JSON lines `{"id", "category", "question", "chosen", "rejected", "key": [names]}` (bench/data/README.md);
`key` lists the acceptable names of the one object whose image region holds the evidence for the answer.

Match rule (kept strict on purpose). Both sides are lower-cased and split into words the way the text is
(runs of letters and digits, inner hyphens kept: "double-decker bus"). A predicted phrase matches an item when
it equals one of the item's `key` names, or a singular/plural form of one, formed on the LAST word only:
strip "ies" -> "y", strip "es", strip "s", add "s" / "es", "y" -> "ies", and a few irregular nouns
(people/person, children/child, leaves/leaf, geese/goose, ...). Nothing else: no head-word matching, no
synonyms beyond those `key` lists. A phrase whose head (its last word or words) is a key name matches too:
"chrome toaster" names a toaster, as the grounder reads it. So "racket" matches a key ["tennis racket"] only
when the key also lists "racket", and "cup" never matches "coffee cup" unless the key says so; "cats" matches
"cat", "coffee table" matches ["table"]. Top-1: the first
phrase matches; top-3: one of the first three does. A row the stage quarantines or returns empty for counts as
a miss.

Forbidden phrases: any of the top 3 phrases of a labelled item that is
- a colour word: always for pure colours ("red", "grey", "navy"); for colour nouns ("orange", "salmon",
  "olive", "gold", "chocolate", ...) only where the item's text uses the word as a colour: next to another
  colour word or "coloured" ("lime green", "salmon and grey"), after is/are/painted or a shade word
  ("is orange", "a deep olive"), or anywhere in an item whose text says "colour" ("What colour is the cake?"
  ... "peach frosting"); "orange juice" or "a lemon wedge" elsewhere are not counted;
- a position word (left, right, top, bottom, side, front, back, middle, center, foreground, background, ...);
- a generic word (picture, image, photo, scene, object, thing, item, piece, part, ...);
- a verb: a word of a fixed list of verb/noun homographs ("wave", "line", "top", "cover", "watch", "stand",
  "roll", ...) that the item's text uses only as a verb: at each occurrence no determiner, number or
  preposition before it and a determiner, pronoun or particle after it ("the man waves to", "people line the
  street", "topped with"); "a roll of paper towels", "the waves are small" or "strapped to ... with two blue
  straps" are not counted. No tagger is used: a heuristic, and the printed examples show the item.
A phrase that matches the item's own key is never counted (in a salmon-fillet item "salmon" is the object).

The bundled sample (examples/data/rlhfv_sample/train.jsonl, 28 rows in RLHF-V layout) is scored too: its
`text` field is a JSON string with question / chosen / rejected, and `annotations[*].label` names the key
object; top-1 against those labels by the same rule ("coffee cup" must be predicted as "coffee cup").

Prints top-1 / top-3 per category and overall, rows/s, the sample's score and the forbidden phrases; writes
bench/results/keywords_accuracy-<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loop_vs_pipeline import REPO, save_result  # pipeline/ and stages/ are imported late (--code)

DEFAULT_DATA = REPO / "bench" / "data" / "keywords_labelled.jsonl"
SAMPLE = REPO / "examples" / "data" / "rlhfv_sample" / "train.jsonl"
TEXT_FIELDS = ("question", "chosen", "rejected")

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_CLAUSE = re.compile(r"[.,;:!?()]")  # the context of a word never crosses punctuation
IRREGULAR = {
    "people": "person",
    "children": "child",
    "schoolchildren": "schoolchild",
    "men": "man",
    "women": "woman",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "leaves": "leaf",
    "knives": "knife",
    "shelves": "shelf",
    "wolves": "wolf",
    "loaves": "loaf",
    "calves": "calf",
    "halves": "half",
    "oxen": "ox",
}
IRREGULAR_PLURAL = {v: k for k, v in IRREGULAR.items()}

PURE_COLOURS = {
    "red", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white", "grey", "gray",
    "beige", "navy", "teal", "turquoise", "cyan", "magenta", "maroon", "lavender", "lilac", "golden", "khaki",
    "burgundy", "crimson", "scarlet", "mauve", "aqua", "color", "colour",
}  # fmt: skip
COLOUR_NOUNS = {
    "orange", "lime", "peach", "salmon", "lemon", "cherry", "cream", "olive", "coral", "chocolate", "gold",
    "silver", "bronze", "copper", "mustard", "mint", "plum", "rose", "ruby", "amber", "emerald", "charcoal",
    "ivory", "blush", "rust", "tan", "honey", "sky", "slate", "caramel",
}  # fmt: skip
COLOURS = PURE_COLOURS | COLOUR_NOUNS
COLOUR_BEFORE = {
    "is", "are", "was", "were", "painted", "dyed", "bright", "dark", "deep", "pale", "light", "soft", "muted",
    "rich", "dull", "vivid", "pastel", "glossy", "matte",
}  # fmt: skip
POSITIONS = {
    "left", "right", "top", "bottom", "side", "front", "back", "middle", "center", "centre", "foreground",
    "background", "corner", "edge", "upper", "lower", "rear",
}  # fmt: skip
GENERIC = {
    "picture", "image", "photo", "photograph", "scene", "object", "thing", "item", "view", "shot",
    "part", "piece", "kind", "type", "subject", "area", "stuff",
}  # fmt: skip
# Verb/noun homographs ("the man waves", "people line the street", "a plate topped with", "he watches the
# match"): counted as verbs only where the text uses them so (verb_use).
VERBS = {
    "wave", "line", "top", "topped", "cover", "covered", "watch", "park", "fly", "ring", "frame", "shade",
    "block", "crowd", "lift", "skip", "feed", "stack", "pour", "brake", "signal", "hang", "stir", "spray",
    "burst", "trail", "climb", "hop", "nap", "doze", "lean", "roll", "throw", "kick", "dig", "leap", "sign",
    "ride", "push", "carry", "hold", "hug", "read", "pull", "turn", "rise", "stand", "sit", "fill", "serve",
    "bounce", "stretch", "light", "bath", "bathe", "fire", "catch", "play", "point", "cast", "drink",
    "face", "mark", "ship", "bow", "duck", "seat", "plant", "step", "walk", "run", "jump", "check", "rest",
    "land", "dress", "iron", "tie", "cap", "slide", "swing", "present", "mount", "head", "strap", "wrap",
}  # fmt: skip
# Words before a noun (determiners, possessives, numbers, prepositions) and after a verb (objects, particles).
NOUN_BEFORE = {
    "a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their", "my", "your", "our",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "some", "several", "many",
    "of", "with", "on", "in", "at", "by", "for", "from", "into", "onto", "over", "under", "near", "beside",
    "behind", "above", "below", "each", "every", "no", "s", "another", "other",
}  # fmt: skip
VERB_AFTER = {
    "a", "an", "the", "this", "that", "his", "her", "its", "their", "him", "them", "it", "me", "us",
    "to", "up", "down", "out", "off", "over", "along", "across", "toward", "towards", "into", "onto", "through",
    "around", "past", "away", "back", "hard", "slowly", "tight", "high", "with", "from", "each", "every",
}  # fmt: skip


# ------------------------------------------------------------------------------------------ matching
def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def singulars(word: str) -> set[str]:
    out = {word}
    if word in IRREGULAR:
        out.add(IRREGULAR[word])
    if word.endswith("ies") and len(word) > 4:
        out.add(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        out.add(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.add(word[:-1])
    return out


def plurals(word: str) -> set[str]:
    out = {word + "s", word + "es"}
    if word in IRREGULAR_PLURAL:
        out.add(IRREGULAR_PLURAL[word])
    if word.endswith("y") and len(word) > 2:
        out.add(word[:-1] + "ies")
    return out


def forms(phrase: str) -> set[str]:
    """The phrase and its singular/plural variants, formed on the last word only."""
    tokens = words(phrase)
    if not tokens:
        return set()
    head, last = tokens[:-1], tokens[-1]
    return {" ".join([*head, w]) for w in singulars(last) | plurals(last)}


def key_forms(key: list[str]) -> set[str]:
    out: set[str] = set()
    for name in key:
        out |= forms(name)
    return out


def matches(phrase: str, key_set: set[str]) -> bool:
    """The phrase, or its head (its last words: "chrome toaster" names a toaster), is one of the key's forms."""
    tokens = words(phrase)
    return any(" ".join(tokens[i:]) in key_set for i in range(len(tokens)))


def inflections(word: str) -> set[str]:
    out = {word, word + "s", word + "es", word + "ed", word + "d", word + "ing"}
    if word.endswith("e"):
        out |= {word[:-1] + "ing"}
    if word.endswith("y"):
        out |= {word[:-1] + "ies", word[:-1] + "ied"}
    if len(word) > 2 and word[-1] not in "aeiouwy" and word[-2] in "aeiou" and word[-3] not in "aeiou":
        out |= {word + word[-1] + "ed", word + word[-1] + "ing"}  # stop -> stopped
    return out


def occurrences(word: str, texts: list[list[str]]) -> list[tuple[str, str, str]]:
    """(previous token, next token, the one after) for each inflected occurrence of `word` in the texts."""
    forms_ = inflections(word)
    found = []
    for tokens in texts:
        padded = ["", *tokens, "", ""]
        found += [(padded[i], padded[i + 2], padded[i + 3]) for i, t in enumerate(tokens) if t in forms_]
    return found


def colour_use(word: str, texts: list[list[str]]) -> bool:
    """The text uses `word` as a colour: "lime green", "salmon and grey", "peach-coloured", "is orange"."""
    if any(t in ("colour", "color", "colours", "colors") for tokens in texts for t in tokens):
        return bool(occurrences(word, texts))  # a colour noun in an item about colours is a colour
    for prev, nxt, after in occurrences(word, texts):
        if nxt in PURE_COLOURS or nxt in ("coloured", "colored") or prev in COLOUR_BEFORE:
            return True
        if nxt in ("and", "or") and after in COLOURS:
            return True
    return False


def verb_use(word: str, texts: list[list[str]]) -> bool:
    """Every occurrence of `word` in the texts reads as a verb ("the man waves to", "people line the street")."""
    found = occurrences(word, texts)
    return bool(found) and all(prev not in NOUN_BEFORE and nxt in VERB_AFTER for prev, nxt, _ in found)


def forbidden_kind(phrase: str, texts: list[list[str]]) -> str | None:
    """Why `phrase` is not an object name in an item with these (tokenised) texts, or None. A phrase of several
    words is judged by its last word ("left side", "hardback book lie"), a colour only if every word is one."""
    tokens = words(phrase)
    if not tokens:
        return None
    variants = singulars(tokens[-1])
    if len(tokens) > 1:
        if all(t in COLOURS or t in COLOUR_BEFORE for t in tokens):
            return "colour"
    elif variants & PURE_COLOURS or any(colour_use(w, texts) for w in variants & COLOUR_NOUNS):
        return "colour"
    if variants & POSITIONS:
        return "position"
    if variants & GENERIC:
        return "generic"
    if any(verb_use(w, texts) for w in variants & VERBS):
        return "verb"
    return None


# ------------------------------------------------------------------------------------------ data
def read_labelled(path: Path) -> list[dict[str, Any]]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        missing = [k for k in ("id", "category", *TEXT_FIELDS, "key") if k not in item]
        if missing:
            raise SystemExit(f"{path}:{n}: missing {missing}")
        if not isinstance(item["key"], list) or not item["key"]:
            raise SystemExit(f"{path}:{n}: key must be a non-empty list of names")
        items.append(item)
    return items


def read_sample(path: Path) -> list[dict[str, Any]]:
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        text = json.loads(row["text"])
        labels = sorted({a["label"] for a in row.get("annotations", []) if a.get("label")})
        items.append(
            {"id": f"sample-{row['idx']}", "category": "sample", **{k: text[k] for k in TEXT_FIELDS}, "key": labels}
        )
    return items


# ------------------------------------------------------------------------------------------ the stage
def build_stage(backend: str, overrides: dict[str, Any]) -> tuple[Any, str | None]:
    """The keywords stage as a worker builds it; (None, reason) when its backend cannot run here."""
    from pipeline.registry import get_stage
    from pipeline.stage import StageContext

    cls = get_stage("keywords")
    config = cls.Config.model_validate({**overrides, "backend": backend})
    stage = cls(config, StageContext(stage="keywords", seed=0, run_name="bench"))
    problems = stage.check()
    if problems:
        return None, "; ".join(problems)
    try:
        stage.setup()
    except Exception as err:  # a missing spaCy pipeline, an unreachable endpoint
        return None, f"{type(err).__name__}: {err}"
    return stage, None


def run_stage(stage: Any, items: list[dict[str, Any]], repeat: int) -> tuple[dict[str, list[str]], float, int]:
    """Key phrases per item id, the best process_batch wall time and the count of rejected rows."""
    import pyarrow as pa

    columns = ["sample_id", *stage.inputs]
    unknown = [c for c in stage.inputs if c not in TEXT_FIELDS]
    if unknown:
        raise SystemExit(f"keywords declares inputs {unknown} that the labelled items do not carry")
    data = {"sample_id": [it["id"] for it in items], **{c: [it[c] for it in items] for c in stage.inputs}}
    table = pa.table({c: pa.array(data[c], pa.string()) for c in columns})
    best = float("inf")
    result = None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = stage.process_batch(table)
        best = min(best, time.perf_counter() - start)
    assert result is not None
    predicted = {
        sid: list(p or [])
        for sid, p in zip(
            result.table.column("sample_id").to_pylist(), result.table.column("key_phrases").to_pylist(), strict=True
        )
    }
    return predicted, best, len(result.rejected)


# ------------------------------------------------------------------------------------------ scoring
def score(items: list[dict[str, Any]], predicted: dict[str, list[str]]) -> dict[str, Any]:
    per: dict[str, Counter] = defaultdict(Counter)
    forbidden: list[dict[str, Any]] = []
    misses: list[dict[str, Any]] = []
    for it in items:
        phrases = predicted.get(it["id"], [])
        keys = key_forms(it["key"])
        top1 = bool(phrases) and matches(phrases[0], keys)
        top3 = any(matches(p, keys) for p in phrases[:3])
        for c in (it["category"], "overall"):
            per[c]["n"] += 1
            per[c]["top1"] += top1
            per[c]["top3"] += top3
        if not top1:
            misses.append({"id": it["id"], "key": it["key"], "predicted": phrases[:3]})
        texts = [words(clause) for f in TEXT_FIELDS for clause in _CLAUSE.split(it[f])]
        for p in phrases[:3]:
            kind = forbidden_kind(p, texts)
            if kind and not matches(p, keys):
                forbidden.append({"id": it["id"], "phrase": p, "kind": kind})
    return {"per_category": {c: dict(v) for c, v in per.items()}, "forbidden": forbidden, "misses": misses}


def ground_selects(items: list[dict[str, Any]], predicted: dict[str, list[str]]) -> int:
    """Rows whose top phrase selects the annotated box the way the ground stage matches a phrase to a label:
    both read as the lexicon's head object ("coffee cup" -> cup, "cat eye" -> eye)."""
    from stages.keywords import LEXICON_PATH, LexiconConfig, head_object, load_lexicon

    ignore = tuple(LexiconConfig().ignore)
    table = load_lexicon(str(LEXICON_PATH), (), ignore)
    hits = 0
    for it in items:
        phrases = predicted.get(it["id"], [])
        hits += bool(phrases) and head_object(phrases[0], table) in {head_object(k, table) for k in it["key"]}
    return hits


def code_identity(stage: Any, code: Path | None) -> dict[str, Any]:
    """Which stage code was measured: the tree, the repository's commit, the stage module's sha256 and whether
    the working tree's copy of it differs from that commit."""
    import hashlib
    import subprocess

    module = Path(sys.modules[type(stage).__module__].__file__ or "")

    def git(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)

    return {
        "tree": str(code) if code else "working tree",
        "repo_head": git("rev-parse", "HEAD").stdout.strip() or None,
        "working_tree_stage_modified": git("diff", "--quiet", "HEAD", "--", "stages/keywords.py").returncode != 0,
        "stage_module": str(module),
        "stage_module_sha256": hashlib.sha256(module.read_bytes()).hexdigest() if module.is_file() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled JSONL (default: %(default)s)")
    parser.add_argument("--backend", choices=["lexicon", "spacy"], default="lexicon")
    parser.add_argument("--config", default="{}", help="JSON object of keywords stage config overrides")
    parser.add_argument("--repeat", type=int, default=3, help="process_batch runs timed, best kept")
    parser.add_argument("--examples", type=int, default=12, help="forbidden phrases and misses shown")
    parser.add_argument("--name", default=None, help="result file suffix (default: the backend)")
    parser.add_argument(
        "--code",
        type=Path,
        default=None,
        help="import pipeline/ and stages/ from this tree instead (e.g. a `git archive HEAD` export: the committed "
        "stage against a working copy's data and script)",
    )
    args = parser.parse_args()
    if args.code is not None:
        sys.path.insert(0, str(args.code.resolve()))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")

    overrides = json.loads(args.config)
    if not isinstance(overrides, dict):
        raise SystemExit("--config must be a JSON object")
    stage, reason = build_stage(args.backend, overrides)
    if stage is None:
        print(f"keywords backend {args.backend!r} cannot run here, skipped: {reason}")
        return
    items = read_labelled(args.data)
    predicted, seconds, rejected = run_stage(stage, items, args.repeat)
    result = score(items, predicted)
    sample_items = read_sample(SAMPLE)
    sample_pred, _, _ = run_stage(stage, sample_items, 1)
    sample = score(sample_items, sample_pred)

    rows = result["per_category"]
    shown_data = args.data.relative_to(REPO) if args.data.is_relative_to(REPO) else args.data
    order = sorted((c for c in rows if c != "overall"), key=lambda c: [it["category"] for it in items].index(c))
    print(
        f"keywords backend {args.backend}, config {json.dumps(overrides)}, inputs {list(stage.inputs)}, "
        f"top_k {stage.config.top_k}; {shown_data}"
    )
    print(f"stage code: {sys.modules[type(stage).__module__].__file__}")
    print("\n| category | n | top-1 | top-3 |\n| --- | ---: | ---: | ---: |")
    for c in [*order, "overall"]:
        r = rows[c]
        name = f"**{c}**" if c == "overall" else c
        print(f"| {name} | {r['n']} | {r['top1'] / r['n']:.1%} | {r['top3'] / r['n']:.1%} |")
    rate = len(items) / seconds if seconds > 0 else float("inf")
    print(
        f"\nprocess_batch: {len(items)} rows in {seconds * 1000:.1f} ms (best of {args.repeat}), {rate:,.0f} rows/s; "
        f"{rejected} rows quarantined"
    )
    passed = [len(p) for p in predicted.values()]
    print(f"phrases passed on per row: mean {sum(passed) / max(len(passed), 1):.2f} (top_k {stage.config.top_k})")
    s = sample["per_category"]["overall"]
    print(f"sample: {s['top1']} of {s['n']} (top-1 against annotations[*].label; top-3 {s['top3']} of {s['n']})")
    grounded = ground_selects(sample_items, sample_pred)
    print(
        f"sample, as `ground` (annotations.select: key_phrases) picks boxes: the top phrase selects its row's "
        f"annotated box in {grounded} of {len(sample_items)}"
    )

    forbidden = result["forbidden"]
    kinds = Counter(f["kind"] for f in forbidden)
    by_kind = ", ".join(f"{k} {v}" for k, v in kinds.most_common()) or "none"
    flagged = len({f["id"] for f in forbidden})
    print(f"\nforbidden phrases in the top 3: {len(forbidden)} in {flagged} of {len(items)} items ({by_kind})")
    for f in forbidden[: args.examples]:
        print(f"  {f['id']}: {f['phrase']!r} ({f['kind']})")
    print(f"\ntop-1 misses (first {args.examples} of {len(result['misses'])}):")
    for m in result["misses"][: args.examples]:
        print(f"  {m['id']}: key {m['key']} predicted {m['predicted']}")

    name = f"keywords_accuracy-{args.name or args.backend}"
    save_result(name, {
        "code": code_identity(stage, args.code),
        "data": str(shown_data),
        "backend": args.backend,
        "config": overrides,
        "inputs": list(stage.inputs),
        "rows": len(items),
        "per_category": rows,
        "rows_per_s": rate,
        "process_batch_s": seconds,
        "quarantined": rejected,
        "sample": {"top1": s["top1"], "top3": s["top3"], "n": s["n"], "misses": sample["misses"]},
        "forbidden": {"count": len(forbidden), "by_kind": dict(kinds), "phrases": forbidden},
        "misses": result["misses"],
        "predicted": predicted,
    })  # fmt: skip
    print(f"\nwrote bench/results/{name}.json")


if __name__ == "__main__":
    main()
