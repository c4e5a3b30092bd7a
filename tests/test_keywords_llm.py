"""The llm keyword backend with a real (tiny, random-weight) causal LM: locally through transformers,
and behind an OpenAI-compatible HTTP endpoint. Its replies are gibberish, so every row must be
quarantined with a parse reason, never crash the run; the API key travels only in the request header."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from helpers import chat_endpoint
from stage_runner import build_stage
from tiny_models import save_tiny_causal_lm

ROWS = pa.table(
    {
        "sample_id": ["1", "2"],
        "question": ["What is on the table?", "Who holds the kite?"],
        "chosen": ["A laptop.", "A small girl."],
        "rejected": ["A tablet.", "A tall man."],
    }
)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "tiny-lm")


def test_local_causal_lm_replies_are_parsed_strictly(lm: Path):
    stage = build_stage(
        "keywords", {"backend": "llm", "llm": {"provider": "huggingface", "model": str(lm), "max_new_tokens": 12}}
    )
    result = stage.process_batch(ROWS)
    assert result.table.num_rows == 0
    assert [r.sample_id for r in result.rejected] == ["1", "2"]
    assert all(r.reason.startswith("keywords: model reply") for r in result.rejected)


def test_openai_compatible_endpoint(lm: Path, monkeypatch: pytest.MonkeyPatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm)
    model = AutoModelForCausalLM.from_pretrained(lm)
    seen: list[dict] = []

    def answer(body: dict, headers: object) -> str:  # the chat-completions protocol, answered by the tiny model
        seen.append({"path": body["_path"], "auth": headers.get("Authorization"), "body": body})  # type: ignore[attr-defined]
        ids = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**ids, max_new_tokens=body.get("max_tokens", 8), do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    monkeypatch.setenv("MY_LLM_KEY", "sk-test-secret")
    with chat_endpoint(answer) as url:
        stage = build_stage(
            "keywords",
            {
                "backend": "llm",
                "llm": {"base_url": url, "model": "tiny", "api_key_env": "MY_LLM_KEY", "max_new_tokens": 8},
            },
        )
        result = stage.process_batch(ROWS)
    assert len(seen) == 2 and seen[0]["path"] == "/v1/chat/completions"
    assert seen[0]["auth"] == "Bearer sk-test-secret"
    prompt = seen[0]["body"]["messages"][0]["content"]  # the prompt template, filled with the whole pair
    assert "What is on the table?" in prompt and "Correct answer: A laptop." in prompt
    assert "Incorrect answer: A tablet." in prompt
    assert result.table.num_rows == 0 and len(result.rejected) == 2
    assert all(r.reason.startswith("keywords: model reply") for r in result.rejected)
    assert "sk-test-secret" not in repr([r.fields for r in result.rejected])


def test_endpoint_needs_a_base_url():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=r"stages\.keywords\.llm\.base_url"):
        build_stage("keywords", {"backend": "llm"})
