"""The LLM judge for detailed descriptions: LLaVA-style review prompt, sent to any OpenAI-compatible
`/chat/completions` endpoint over HTTP."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
ROLE = "Assistant"
# The official Osprey rule for the "description" category (LLaVA review rule with region information).
DESCRIPTION_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image.  In addition, specific object "
    "locations within the image are given, along with detailed coordinates. These coordinates are in the form of "
    "bounding boxes, represented as (x1, y1, x2, y2) with floating numbers ranging from 0 to 1. These values "
    "correspond to the top left x, top left y, bottom right x, and bottom right y. Also, several region "
    "description are given, each describing a box region of image, with detailed coordinates. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment."
)


def review_prompt(
    context: str, question: str, reference: str, answer: str, rule: str = DESCRIPTION_RULE
) -> str:
    """The judge's user message: context, question, Assistant 1 = reference (GPT-4), Assistant 2 = ours."""
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{ROLE} 1]\n{reference}\n\n[End of {ROLE} 1]\n\n"
        f"[{ROLE} 2]\n{answer}\n\n[End of {ROLE} 2]\n\n"
        f"[System]\n{rule}\n\n"
    )


class JudgeClient:
    """POST `{url}/chat/completions` (OpenAI-compatible); retries rate limits and server errors with backoff."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 0.2,
        max_tokens: int = 1024,
        retries: int = 5,
        timeout: float = 300.0,
    ) -> None:
        import httpx

        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    def review(self, content: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        import httpx

        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                resp = self.client.post(self.url, json=body)
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    return resp.json()["choices"][0]["message"]["content"] or ""
                error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in (408, 409, 429) and resp.status_code < 500:
                    raise RuntimeError(f"judge {self.url} refused the request: {error}")
            if attempt < self.retries:
                logger.warning("judge request failed (%s); retrying in %.0f s", error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise RuntimeError(f"judge {self.url} failed after {self.retries + 1} attempts: {error}")
