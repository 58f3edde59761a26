"""What a Codex run cost, computed from its token counts, because `codex exec --json` reports no dollars.

Prices are OpenAI's public list prices for the standard tier in USD per 1M tokens, as shown on
https://openai.com/api/pricing (and on https://developers.openai.com/codex/models for which models Codex
offers), checked November 2026. They are list prices: they ignore negotiated discounts, Batch/Flex/Priority
tiers and ChatGPT-plan billing, and they change. Update this table when OpenAI changes its prices or Codex
its models; a model missing from it gets no cost at all rather than a guessed one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens. Cached input is the discounted rate for the prompt prefix OpenAI served from cache."""

    input_usd: float
    cached_input_usd: float
    output_usd: float


OPENAI_PRICES_PER_MILLION: dict[str, ModelPrice] = {
    "gpt-5.5": ModelPrice(input_usd=5.00, cached_input_usd=0.50, output_usd=30.00),
    "gpt-5.4": ModelPrice(input_usd=2.50, cached_input_usd=0.25, output_usd=15.00),
    "gpt-5.4-mini": ModelPrice(input_usd=0.75, cached_input_usd=0.075, output_usd=4.50),
    "gpt-5.4-nano": ModelPrice(input_usd=0.20, cached_input_usd=0.02, output_usd=1.25),
    "gpt-5.3-codex": ModelPrice(input_usd=1.75, cached_input_usd=0.175, output_usd=14.00),
    "gpt-5.2": ModelPrice(input_usd=1.75, cached_input_usd=0.175, output_usd=14.00),
    "gpt-5-codex": ModelPrice(input_usd=1.25, cached_input_usd=0.125, output_usd=10.00),
    "gpt-5": ModelPrice(input_usd=1.25, cached_input_usd=0.125, output_usd=10.00),
    "gpt-5-mini": ModelPrice(input_usd=0.25, cached_input_usd=0.025, output_usd=2.00),
}


def openai_cost_usd(model: str, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> float | None:
    """The list-price cost of a run, or None for a model the table does not know.

    OpenAI counts cached tokens inside `input_tokens`, so only the uncached remainder pays the full input rate.
    """
    price = OPENAI_PRICES_PER_MILLION.get(model)
    if price is None:
        return None
    uncached_input_tokens = max(input_tokens - cached_input_tokens, 0)
    dollars = (
        uncached_input_tokens * price.input_usd + cached_input_tokens * price.cached_input_usd + output_tokens * price.output_usd
    ) / 1_000_000
    return round(dollars, 6)
