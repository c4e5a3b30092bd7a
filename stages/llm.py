"""The language-model client shared by the stages and tools that ask a text model something (the keywords
stage's `llm` backend, the evaluation's judge): an OpenAI-compatible chat endpoint, or a local Hugging Face
causal LM, one prompt in, the reply's text out.

The endpoint is reached with plain HTTP (requests), not the Hub client, so that HF_HUB_OFFLINE=1 does not
cut off a local server. Connection errors, timeouts, 429 and 5xx are retried with exponential backoff
(tenacity); a prompt still failing is a `RowError("transient: ...")` (quarantined, retried on the next
run); any other HTTP error is the configuration's fault and stops the work, naming the config key.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mfpo.text import TEXT_SLOT, UnencodableText, around_slot, special_strings, text_ids
from pipeline.errors import PipelineError, RowError
from pipeline.strict import StrictModel


class LlmConfig(StrictModel):
    provider: Literal["openai", "huggingface"] = Field("openai", description="Endpoint kind.")
    base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    model: str = Field("gpt-4o-mini", description="Model name at the endpoint, or a Hub id / local path.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    prompt: str = Field("keywords.txt", description="Template in prompts/ (or a path) with {question} {answer}.")
    max_new_tokens: int = Field(64, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0, description="Retries of a request on connection errors, timeouts, 429 and 5xx.")
    retry_wait_s: float = Field(1.0, ge=0, description="First backoff wait; doubled on each retry (at most 30 s).")
    trust_remote_code: bool = False


def load_template(prompt: str, key: str) -> str:
    """A prompt template: a path, or the name of a template bundled in the `prompts` package."""
    path = Path(prompt)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    bundled = resources.files("prompts").joinpath(prompt)
    if "/" not in prompt and bundled.is_file():
        return bundled.read_text(encoding="utf-8")
    names = sorted(t.name for t in resources.files("prompts").iterdir() if t.name.endswith(".txt"))
    raise PipelineError(f"{key}: template not found: {prompt} (not a file; bundled templates: {', '.join(names)})")


def chat_ids(tokenizer: Any, prompt: str, label: str) -> dict[str, Any]:
    """The user turn `prompt`, rendered by the chat template and tokenised. Data in the prompt (a question, an
    answer) that holds a special token's string (`<|im_end|>`) is tokenised as text, so it cannot end the turn or
    open another one; other prompts take the template's own path, token for token."""
    import torch

    messages = [{"role": "user", "content": prompt}]
    if not any(s in prompt for s in special_strings(tokenizer)):
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXT_SLOT}], add_generation_prompt=True, tokenize=False
    )
    try:
        before, after = around_slot(rendered, "prompt")
        ids = tokenizer(before, add_special_tokens=False)["input_ids"] + text_ids(tokenizer, prompt, "prompt")
    except UnencodableText as err:
        raise RowError(f"{label}: {err}") from None
    ids += tokenizer(after, add_special_tokens=False)["input_ids"]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}


class _Transient(Exception):
    """A reply worth retrying: 429 or 5xx."""


class LlmClient:
    """`complete(prompt) -> reply text`. `key` (e.g. `stages.keywords.llm`) names the config in errors, `label`
    (e.g. `keywords`) the caller in row-level reasons."""

    def __init__(self, cfg: LlmConfig, key: str, label: str) -> None:
        self.cfg, self.key, self.label = cfg, key, label
        if cfg.provider == "openai":
            import requests

            api_key = os.environ.get(cfg.api_key_env)
            if cfg.base_url is None:
                raise PipelineError(f"{key}.base_url: set the endpoint, e.g. http://localhost:8000/v1")
            self.session = requests.Session()
            self.url = cfg.base_url.rstrip("/") + "/chat/completions"
            self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
            self.model.eval()

    def complete(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.cfg.provider == "openai":
            payload = {
                "model": self.cfg.model,
                "messages": messages,
                "max_tokens": self.cfg.max_new_tokens,
                "temperature": 0.0,
            }
            reply = self._post(payload)
            try:
                return reply["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise RowError(f"{self.label}: endpoint reply is not a chat completion: {str(reply)[:80]!r}") from None
        import torch

        ids = chat_ids(self.tokenizer, prompt, self.label)
        with torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def _post(self, payload: dict[str, Any]) -> Any:
        """One chat completion, retried with exponential backoff on connection errors, timeouts, 429 and 5xx."""
        import requests
        import tenacity

        def transient(err: BaseException) -> bool:
            return isinstance(err, _Transient | requests.ConnectionError | requests.Timeout)

        try:
            for attempt in tenacity.Retrying(
                stop=tenacity.stop_after_attempt(self.cfg.retries + 1),
                wait=tenacity.wait_exponential(multiplier=self.cfg.retry_wait_s, max=30),
                retry=tenacity.retry_if_exception(transient),
                reraise=True,
            ):
                with attempt:
                    resp = self.session.post(self.url, json=payload, headers=self.headers, timeout=self.cfg.timeout_s)
                    if resp.status_code == 429 or resp.status_code >= 500:
                        raise _Transient(f"HTTP {resp.status_code}")
                    if resp.status_code >= 400:
                        raise PipelineError(
                            f"{self.key}: {self.url} answered HTTP {resp.status_code}: {resp.text[:120]!r}"
                        )
                    return resp.json()
        except (_Transient, requests.ConnectionError, requests.Timeout) as err:
            kind = type(err).__name__ if not isinstance(err, _Transient) else str(err)
            raise RowError(
                f"transient: {self.label} endpoint {self.url}: {kind} after {self.cfg.retries + 1} attempt(s)"
            ) from None
        except ValueError:
            raise RowError(f"{self.label}: endpoint reply is not JSON") from None
