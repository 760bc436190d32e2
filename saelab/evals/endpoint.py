"""An optional LLM explainer and detection scorer through an OpenAI-compatible endpoint (vLLM, llama.cpp's server,
Ollama and others serve `POST {base_url}/chat/completions`). Nothing in saelab needs one: the offline labels
(`saelab.analysis.labels`) and their MiniLM score are the default, and the tests never call an endpoint.

- `explain`: the model reads a latent's top contexts (the token where it fires marked `<<like this>>`) and answers
  with a short explanation.
- `detect`: the model reads the explanation and a shuffled mix of activating and random contexts and answers, for
  each, whether the latent fires on it (delphi's detection scorer, in one call per latent); the score is the
  balanced accuracy of those answers.

An endpoint that does not answer raises `EndpointError` naming the address and the fix; `saelab eval` then keeps
every other result (the MiniLM scores included) and lists the LLM part as skipped.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from saelab.errors import SaelabError


class EndpointError(SaelabError, RuntimeError):
    """An OpenAI-compatible endpoint did not answer, or answered something unreadable."""


@dataclass(frozen=True)
class Endpoint:
    """Where the LLM is served."""

    base_url: str
    """The API root, e.g. `http://127.0.0.1:8000/v1` (vLLM), `http://127.0.0.1:11434/v1` (Ollama)."""
    model: str
    """The model name the server knows."""
    api_key_env: str | None = None
    """An environment variable holding the API key, sent as a bearer token (None: no key; local servers need none)."""
    timeout: float = 60.0
    """Seconds to wait for each answer."""

    def chat(self, prompt: str, *, max_tokens: int = 200) -> str:
        """The model's answer to one user message (temperature 0)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise EndpointError(f"the environment variable {self.api_key_env} holding the API key is not set")
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise EndpointError(
                f"the LLM endpoint {url} does not answer ({reason}); start the server (vLLM, llama.cpp, Ollama) at "
                "that address, fix the base URL, or leave the endpoint out to use the offline labels alone"
            ) from None
        except json.JSONDecodeError as err:
            raise EndpointError(f"the LLM endpoint {url} answered something that is not JSON ({err})") from None
        try:
            return str(answer["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise EndpointError(
                f"the LLM endpoint {url} answered without choices[0].message.content; is it OpenAI-compatible?"
            ) from None


def explain(endpoint: Endpoint, contexts: Sequence[str]) -> str:
    """A short explanation of what a latent fires on, from its top `contexts` (the firing token marked `<<..>>`)."""
    examples = "\n".join(f"{i + 1}. {text}" for i, text in enumerate(contexts))
    prompt = (
        "A neuron of a language model fires on the tokens marked <<like this>> in these texts:\n"
        f"{examples}\n"
        "In at most 12 words, what does it fire on? Answer with the explanation alone."
    )
    return endpoint.chat(prompt, max_tokens=40).strip()


def detect(
    endpoint: Endpoint, explanation: str, positives: Sequence[str], negatives: Sequence[str], *, seed: int = 0
) -> float:
    """The balanced accuracy with which the model, given `explanation`, tells `positives` (where the latent fires)
    from `negatives` (random contexts), asked about all of them in one shuffled list."""
    if not positives or not negatives:
        raise EndpointError("detection needs at least one activating and one random context")
    items = [(text, True) for text in positives] + [(text, False) for text in negatives]
    random.Random(seed).shuffle(items)
    listed = "\n".join(f"{i + 1}. {text}" for i, (text, _) in enumerate(items))
    prompt = (
        f"A neuron fires on: {explanation}\nFor each text below, answer 1 if the neuron fires somewhere in it, "
        f"0 if not.\n{listed}\nAnswer with {len(items)} digits separated by spaces, nothing else."
    )
    digits = re.findall(r"[01]", endpoint.chat(prompt, max_tokens=4 * len(items)))
    if len(digits) < len(items):
        raise EndpointError(f"the model answered {len(digits)} of {len(items)} detection digits; try a larger model")
    said = [d == "1" for d in digits[: len(items)]]
    hits = [s for s, (_, fires) in zip(said, items) if fires]
    rejections = [not s for s, (_, fires) in zip(said, items) if not fires]
    return 0.5 * (sum(hits) / len(hits) + sum(rejections) / len(rejections))
